#!/usr/bin/env bash
# Renders, lints and validates the Helm chart in charts/berth, offline.
#
#   scripts/check-chart.sh            # needs: python3 (with venv), cargo; PyPI on first run
#
# For each values set (the chart's defaults; charts/berth/ci/*-values.yaml: all-on switches
# on every optional part, fleet is three replicas on an S3-compatible bucket; and a few
# fleet variants written by this script: IRSA with a generated secret, a claim per pod
# with hard anti-affinity, GCS, Azure, replicas without shared storage; and tenancy alone:
# tokens, rules and a per-repository robot account):
#   1. lint the chart strictly (`helm lint --strict` when a helm binary is on PATH, and
#      always helm-python-sdk's lint with strict=true: Helm's own Go code, no binary);
#   2. render it (helm-python-sdk, offline) and check what the chart promises: probes,
#      ports, security context, store volume, config checksum; the admin token (always:
#      berth refuses admin mutations without one): its Secret (generated, from
#      adminToken.value, or none with adminToken.existingSecret), its mount, and
#      server.admin_token_file in berth.toml pointing at it; for a fleet (sharedStorage)
#      also the replica count, the headless peers Service, BERTH_FLEET_ADVERTISE from the
#      pod IP, the bucket credentials, the fleet secret and its mount, [storage.shared] and
#      [fleet] (peers_dns naming the headless Service) in berth.toml, anti-affinity, the
#      PodDisruptionBudget and the NetworkPolicy rule between replicas; for tenancy the
#      upstream credentials volume at /etc/berth/secrets (one projected volume: the shared
#      Secret at .dockerconfigjson, each credentials.perRepository Secret at
#      <name>/.dockerconfigjson) and its [[upstreams.credentials]] blocks (quota.requests an
#      integer), the auth.* Secrets mounted under /etc/berth/auth with [auth] tokens_dir,
#      htpasswd and client_ca pointing at them (client_ca only with server.tls_*), no
#      checksum annotation for them (berth re-reads tokens in place), and config.auth /
#      config.access passed through unchanged ([[access]] as an array of tables);
#   3. validate every rendered manifest with `kubernetes-validate --strict` against the
#      schemas it bundles for Kubernetes $KUBE_VERSION. The ServiceMonitor is skipped: it
#      is a CRD (monitoring.coreos.com/v1) with no bundled schema; its fields are checked
#      in step 2 instead;
#   4. take berth.toml out of the rendered ConfigMap and run `berth check-config` on it,
#      with the files it names (credentials, admin token, fleet secret, auth files, TLS)
#      taken from the rendered Secrets, or placeholders for Secrets named by existingSecret
#      values and extraVolumes (shaped by the key naming them: a tokens directory laid out
#      as a Secret volume, a bcrypt htpasswd line, PEM from openssl, a dockerconfigjson with
#      an entry per upstream host).
# Then values mistakes (a missing bucket, an unknown store kind, a fleet configured by hand,
# a per-repository credential for an unknown upstream, a client CA without TLS, ...) must
# fail to render with a message. A summary lists every step, pass or FAIL.
#
# Python tools live in a venv under ${BERTH_PEERS_CACHE:-~/.cache/berth-test-peers}/venv,
# installed from PyPI when missing. Set BERTH_BIN to use a prebuilt berth binary instead
# of `cargo build`. Exits non-zero, saying what failed, on any failure.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.30.0}"
HELM_PYTHON_SDK_VERSION="0.2.2"
KUBERNETES_VALIDATE_VERSION="1.37.0"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="$repo/charts/berth"
cache="${BERTH_PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth-test-peers}"
venv="$cache/venv"

die() {
    echo "check-chart: FAILED: $*" >&2
    exit 1
}
say() { echo "check-chart: $*"; }

# --- tools -------------------------------------------------------------------------------
if ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
    say "installing helm-python-sdk and kubernetes-validate into $venv"
    mkdir -p "$cache"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "python3 -m venv $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "helm-python-sdk==$HELM_PYTHON_SDK_VERSION" \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" ||
        die "pip install helm-python-sdk kubernetes-validate (PyPI must be reachable on first run)"
fi
py="$venv/bin/python"

if [ -n "${BERTH_BIN:-}" ]; then
    berth="$BERTH_BIN"
else
    say "building berth (cargo build --bin berth)"
    (cd "$repo" && cargo build --quiet --bin berth) || die "cargo build --bin berth"
    berth="${CARGO_TARGET_DIR:-$repo/target}/debug/berth"
fi
[ -x "$berth" ] || die "no berth binary at $berth"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- the Python half: lint, render, structural checks, split files ----------------------
# checks.py holds the checks (one set for every values file: what the chart promises for
# those values); chart.py runs them on one values file.
cat >"$work/checks.py" <<'PY'
# Shared by chart.py and variants.py: render the chart and check what it promises.
import base64, json, os, re, subprocess
import yaml  # PyYAML, a dependency of kubernetes-validate
import helm_python as helm

try:
    import tomllib  # Python 3.11+
except ImportError:  # older Pythons: the TOML checks fall back to the text
    tomllib = None

RELEASE, NAMESPACE = "berth", "berth"
FULLNAME = "berth"  # release "berth" contains the chart name
SELECTOR = {
    "app.kubernetes.io/name": "berth",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/component": "proxy",
}
PEERS = f"{FULLNAME}-peers"
PEERS_DNS = f"{PEERS}.{NAMESPACE}.svc.cluster.local:5000"


def deep_merge(base, over):
    """Helm's values merge: maps merge, everything else (lists included) replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base.get(k), v) if k in base else v
        return out
    return over


def effective_values(chart_dir, values):
    with open(os.path.join(chart_dir, "values.yaml")) as f:
        return deep_merge(yaml.safe_load(f), values or {})


def lint(chart_dir, values, problems):
    report = helm.lint(chart_dir, values, strict=True, kube_version="v" + os.environ["KUBE_VERSION"])
    for m in report.get("messages") or []:
        if m.get("severity", 0) >= 2:  # 2 warning, 3 error: strict fails on both
            problems.append(f"lint: {m.get('path')}: {m.get('error')}")
    for e in report.get("errors") or []:
        problems.append(f"lint: {e}")


def render(chart_dir, values):
    """Returns ([(path, doc)], NOTES.txt text)."""
    rendered = helm.Chart.load(chart_dir).render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs, notes = [], ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs, notes


def write_manifests(docs, directory):
    os.makedirs(directory, exist_ok=True)
    for _, doc in docs:
        name = f"{doc['kind']}-{doc['metadata']['name']}.yaml"
        if doc["kind"] == "ServiceMonitor":
            name = "skip-" + name  # a CRD: no bundled schema
        with open(os.path.join(directory, name), "w") as f:
            yaml.safe_dump(doc, f)


def by_kind(docs):
    kinds = {}
    for _, doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def parse_toml(text, problems):
    if tomllib is None:
        return None
    try:
        return tomllib.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error as a problem
        problems.append(f"berth.toml does not parse: {e}")
        return None


def check(docs, notes, values, chart_dir, problems):
    """Checks the rendered chart against the effective values. Returns (workload, berth.toml text)."""
    v = effective_values(chart_dir, values)
    need = lambda cond, what: cond or problems.append(what)  # noqa: E731
    kinds = by_kind(docs)
    fleet = bool(v["sharedStorage"]["enabled"])

    # --- the workload ---------------------------------------------------------------
    expected_kind = "StatefulSet"
    if fleet and v["sharedStorage"]["localCache"]["type"] == "emptyDir":
        expected_kind = "Deployment"
    workloads = kinds.get("StatefulSet", []) + kinds.get("Deployment", [])
    need(len(workloads) == 1, f"expected one StatefulSet or Deployment, got {len(workloads)}")
    wl = workloads[0] if workloads else None
    toml_text = None
    if wl:
        need(wl["kind"] == expected_kind, f"workload is a {wl['kind']}, expected a {expected_kind}")
        need(wl["spec"]["replicas"] == v["replicaCount"], f"replicas {wl['spec']['replicas']}, expected {v['replicaCount']}")
        pod = wl["spec"]["template"]
        spec = pod["spec"]
        need(selects(SELECTOR, pod["metadata"]["labels"]), "pod labels")
        c = spec["containers"][0]
        need(c["args"][-3:] == ["serve", "--config", "/etc/berth/berth.toml"], f"berth args: {c['args']}")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        need(ports == {"registry": 5000, "admin": 5001}, f"container ports: {ports}")
        need(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, "liveness probe")
        need(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, "readiness probe")
        sc, psc = c["securityContext"], spec["securityContext"]
        need(sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 65532 and sc.get("runAsGroup") == 65532, "runAsNonRoot/65532")
        need(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
        need(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation")
        need(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL")
        need(psc.get("fsGroup") == 65532 and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "fsGroup/seccomp")
        need("checksum/config" in pod["metadata"].get("annotations", {}), "checksum/config annotation")
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        need(mounts.get("/var/lib/berth") == "store", "store not mounted at /var/lib/berth")
        volumes = {vol["name"]: vol for vol in spec.get("volumes", [])}
        if wl["kind"] == "StatefulSet":
            vcts = wl["spec"].get("volumeClaimTemplates") or []
            need(len(vcts) == 1 and vcts[0]["metadata"]["name"] == "store"
                 and vcts[0]["spec"]["resources"]["requests"]["storage"] == v["persistence"]["size"],
                 "volumeClaimTemplate store with persistence.size")
            need("store" not in volumes, "a StatefulSet's store must come from its claim, not a pod volume")
            # Unchanged by sharedStorage: serviceName is immutable on an existing StatefulSet.
            need(wl["spec"]["serviceName"] == FULLNAME, f"serviceName {wl['spec']['serviceName']}")
        else:
            ed = volumes.get("store", {}).get("emptyDir")
            need(ed is not None, "Deployment: store is not an emptyDir")
            if ed is not None and v["sharedStorage"]["localCache"]["sizeLimit"]:
                need(str(ed.get("sizeLimit")) == str(v["sharedStorage"]["localCache"]["sizeLimit"]), "emptyDir sizeLimit")
            need(not wl["spec"].get("volumeClaimTemplates"), "Deployment with volumeClaimTemplates")
        env = c.get("env") or []
        env_names = [e["name"] for e in env]
        envs = {e["name"]: e for e in env}

    # --- Services, ServiceMonitor, dashboard ----------------------------------------------
    services = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
    need({"berth", "berth-admin"} <= set(services), f"services: {sorted(services)}")
    for sm in kinds.get("ServiceMonitor", []):
        ep = sm["spec"]["endpoints"][0]
        need(ep.get("port") == "admin" and ep.get("path") == "/metrics", "ServiceMonitor endpoint")
        sel = sm["spec"]["selector"]["matchLabels"]
        for name, svc in services.items():
            chosen = selects(sel, svc["metadata"]["labels"])
            need(chosen == (name == "berth-admin"), f"ServiceMonitor selects {name}: {chosen}")
    for cm in kinds.get("ConfigMap", []):
        if "berth.json" in cm.get("data", {}):
            __import__("json").loads(cm["data"]["berth.json"])  # the dashboard survives templating
            need(cm["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard label")
    cms = [cm for cm in kinds.get("ConfigMap", []) if "berth.toml" in cm.get("data", {})]
    need(len(cms) == 1, "exactly one ConfigMap with berth.toml")
    if cms:
        toml_text = cms[0]["data"]["berth.toml"]
    toml = parse_toml(toml_text, problems) if toml_text else None

    # --- the admin token: always configured (berth refuses admin mutations without one) --
    at = v["adminToken"]
    at_secret = at["existingSecret"] or f"{FULLNAME}-admin-token"
    at_file = f"/etc/berth/admin-token/{at['key']}"
    if wl:
        atv = volumes.get("admin-token", {}).get("secret", {})
        need(atv.get("secretName") == at_secret and atv.get("items") == [{"key": at["key"], "path": at["key"]}],
             f"admin-token volume: {atv}, expected the Secret {at_secret} key {at['key']}")
        need(mounts.get("/etc/berth/admin-token") == "admin-token", "admin token not mounted at /etc/berth/admin-token")
    if toml_text:
        need(re.search(r'^\s*admin_token_file = "' + re.escape(at_file) + '"', toml_text, re.M) is not None,
             f"berth.toml: server.admin_token_file is not {at_file}")
    if toml:
        need(toml.get("server", {}).get("admin_token_file") == at_file,
             f"[server] admin_token_file: {toml.get('server', {}).get('admin_token_file')!r}, expected {at_file}")
    at_rendered = next((x for x in kinds.get("Secret", []) if x["metadata"]["name"] == f"{FULLNAME}-admin-token"), None)
    if at["existingSecret"]:
        need(at_rendered is None, "admin token Secret rendered although adminToken.existingSecret is set")
    else:
        need(at_rendered is not None, f"no Secret {FULLNAME}-admin-token (adminToken.existingSecret is empty)")
        if at_rendered:
            raw = base64.b64decode((at_rendered.get("data") or {}).get(at["key"], "")).decode()
            if at["value"]:
                need(raw == at["value"], "admin token Secret does not hold adminToken.value")
            else:
                need(re.fullmatch(r"[A-Za-z0-9]{32}", raw) is not None, "generated admin token is not 32 alphanumerics")
    need(at_secret in notes, f"NOTES.txt does not say the admin token is in the Secret {at_secret}")

    # --- tenancy: upstream credentials, client authentication, rules ---------------------
    check_tenancy(v, wl, toml, notes, need)

    # --- the node DaemonSet keeps pointing at the pull Service ---------------------------
    for ds in kinds.get("DaemonSet", []):
        args = ds["spec"]["template"]["spec"]["initContainers"][0]["args"]
        endpoint = args[args.index("--endpoint") + 1]
        expected = v["nodeConfig"]["endpoint"] or f"http://{v['service']['clusterIP']}:{v['service']['port']}"
        need(endpoint == expected, f"node DaemonSet endpoint {endpoint}, expected the pull Service {expected}")
        # A node token (nodeConfig.tokenSecret) goes to containerd-config as a file from
        # the Secret; without one, hosts.toml carries no credentials.
        pod = ds["spec"]["template"]["spec"]
        token_secret = v["nodeConfig"].get("tokenSecret") or ""
        token_vol = next((x for x in pod.get("volumes", []) if x["name"] == "node-token"), None)
        token_arg = args[args.index("--token-file") + 1] if "--token-file" in args else None
        if token_secret:
            need(token_arg == "/etc/berth/node-token/token",
                 f"node DaemonSet: no --token-file /etc/berth/node-token/token in {args}")
            need(token_vol is not None and token_vol["secret"]["secretName"] == token_secret
                 and token_vol["secret"]["items"] == [{"key": v["nodeConfig"]["tokenKey"], "path": "token"}],
                 f"node DaemonSet: volume node-token from {token_secret}/{v['nodeConfig']['tokenKey']}: {token_vol}")
            mounts = pod["initContainers"][0].get("volumeMounts", [])
            need({"name": "node-token", "mountPath": "/etc/berth/node-token", "readOnly": True} in mounts,
                 f"node DaemonSet: node-token not mounted read-only at /etc/berth/node-token: {mounts}")
        else:
            need(token_arg is None and token_vol is None, "node DaemonSet: a token without nodeConfig.tokenSecret")

    # --- PodDisruptionBudget ---------------------------------------------------------------
    pdb_on = str(v["podDisruptionBudget"]["enabled"]).lower()
    want_pdb = pdb_on == "true" or (pdb_on == "auto" and fleet and int(v["replicaCount"]) > 1)
    pdbs = kinds.get("PodDisruptionBudget", [])
    need(len(pdbs) == (1 if want_pdb else 0), f"PodDisruptionBudgets: {len(pdbs)}, expected {1 if want_pdb else 0}")
    for pdb in pdbs:
        need(pdb["spec"]["selector"]["matchLabels"] == SELECTOR, "PDB selector")
        need(pdb["spec"].get("maxUnavailable") == 1 or "minAvailable" in pdb["spec"], "PDB maxUnavailable 1 / minAvailable")

    if not fleet:
        need(PEERS not in services, "peers Service without sharedStorage")
        if wl:
            need("BERTH_FLEET_ADVERTISE" not in env_names, "BERTH_FLEET_ADVERTISE without sharedStorage")
        need(toml_text is None or not re.search(r"^\s*\[(fleet|storage\.shared)\]", toml_text, re.M),
             "[fleet] or [storage.shared] in berth.toml without sharedStorage")
        if int(v["replicaCount"]) > 1:
            need("WARNING: replicaCount" in notes, "NOTES.txt: no warning for replicaCount > 1 without sharedStorage")
        return wl, toml_text

    # --- the fleet -------------------------------------------------------------------------
    s, f = v["sharedStorage"], v["fleet"]
    peers = services.get(PEERS)
    need(peers is not None, f"no headless Service {PEERS}")
    if peers:
        ps = peers["spec"]
        need(ps.get("clusterIP") == "None", f"{PEERS}: clusterIP {ps.get('clusterIP')!r}, expected None")
        need(ps.get("publishNotReadyAddresses") is False, f"{PEERS}: publishNotReadyAddresses must be false")
        need(ps.get("selector") == SELECTOR, f"{PEERS}: selector")
        need([(p["name"], p["port"], p["targetPort"]) for p in ps["ports"]] == [("registry", 5000, "registry")],
             f"{PEERS}: ports {ps['ports']}")
    if wl:
        need(envs.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
             "env POD_IP from the downward API (status.podIP)")
        adv = "http://[$(POD_IP)]:5000" if f["ipv6"] else "http://$(POD_IP):5000"
        need(envs.get("BERTH_FLEET_ADVERTISE", {}).get("value") == adv, f"env BERTH_FLEET_ADVERTISE={adv}")
        if "POD_IP" in env_names and "BERTH_FLEET_ADVERTISE" in env_names:
            need(env_names.index("POD_IP") < env_names.index("BERTH_FLEET_ADVERTISE"),
                 "POD_IP must come before BERTH_FLEET_ADVERTISE ($(POD_IP) expands only earlier variables)")
        bucket_secret = s["credentials"]["existingSecret"]
        if s["kind"] == "s3" and bucket_secret:
            for var, key in (("AWS_ACCESS_KEY_ID", "accessKeyIdKey"), ("AWS_SECRET_ACCESS_KEY", "secretAccessKeyKey")):
                ref = envs.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
                need(ref == {"name": bucket_secret, "key": s["credentials"][key]}, f"env {var} from secret {bucket_secret}/{s['credentials'][key]}: {ref}")
        else:
            need(not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_names), "AWS_* env without s3 credentials.existingSecret")
        if s["kind"] in ("gcs", "azure") and bucket_secret:
            vol = volumes.get("bucket-credentials", {}).get("secret", {})
            path = "service-account.json" if s["kind"] == "gcs" else "access-key"
            key = s["credentials"]["serviceAccountKey" if s["kind"] == "gcs" else "accessKeyKey"]
            need(vol.get("secretName") == bucket_secret and vol.get("items") == [{"key": key, "path": path}], f"bucket-credentials volume: {vol}")
            need(mounts.get("/etc/berth/bucket") == "bucket-credentials", "bucket credentials not mounted at /etc/berth/bucket")
        fleet_secret = f["existingSecret"] or f"{FULLNAME}-fleet"
        fsv = volumes.get("fleet-secret", {}).get("secret", {})
        need(fsv.get("secretName") == fleet_secret and fsv.get("items") == [{"key": f["secretKey"], "path": "secret"}],
             f"fleet-secret volume: {fsv}")
        need(mounts.get("/etc/berth/fleet") == "fleet-secret", "fleet secret not mounted at /etc/berth/fleet")
        aff = (spec.get("affinity") or {}).get("podAntiAffinity")
        user_aff = (v.get("affinity") or {}).get("podAntiAffinity")
        if user_aff:
            need(aff == user_aff, "affinity.podAntiAffinity from values not kept")
        elif f["antiAffinity"] == "none":
            need(aff is None, "podAntiAffinity with fleet.antiAffinity none")
        else:
            field = "requiredDuringSchedulingIgnoredDuringExecution" if f["antiAffinity"] == "hard" else "preferredDuringSchedulingIgnoredDuringExecution"
            terms = (aff or {}).get(field) or []
            term = (terms[0].get("podAffinityTerm", terms[0]) if terms else {})
            need(term.get("topologyKey") == f["antiAffinityTopologyKey"] and term.get("labelSelector", {}).get("matchLabels") == SELECTOR,
                 f"pod anti-affinity ({field}) over {f['antiAffinityTopologyKey']}: {aff}")
    if not f["existingSecret"]:
        sec = next((x for x in kinds.get("Secret", []) if x["metadata"]["name"] == f"{FULLNAME}-fleet"), None)
        need(sec is not None, f"no Secret {FULLNAME}-fleet (fleet.existingSecret is empty)")
        if sec:
            raw = base64.b64decode(sec["data"].get(f["secretKey"], "")).decode()
            if f["secret"]:
                need(raw == f["secret"], "fleet Secret does not hold fleet.secret")
            else:
                need(re.fullmatch(r"[A-Za-z0-9]{48}", raw) is not None, "generated fleet secret is not 48 alphanumerics")
    else:
        need(not any(x["metadata"]["name"] == f"{FULLNAME}-fleet" for x in kinds.get("Secret", [])),
             "fleet Secret rendered although fleet.existingSecret is set")
    for np in kinds.get("NetworkPolicy", []):
        rule = np["spec"]["ingress"][0]
        if "from" in rule:
            need({"podSelector": {"matchLabels": SELECTOR}} in rule["from"],
                 "NetworkPolicy: the replicas may not reach each other's pull port")
    if toml_text:
        need(re.search(r"^\s*\[storage\.shared\]", toml_text, re.M) is not None, "berth.toml has no [storage.shared]")
        need(re.search(r"^\s*\[fleet\]", toml_text, re.M) is not None, "berth.toml has no [fleet]")
        need(re.search(r'^\s*peers_dns = "' + re.escape(PEERS_DNS) + '"', toml_text, re.M) is not None,
             f"berth.toml: fleet.peers_dns is not {PEERS_DNS}")
    if toml:
        shared = toml.get("storage", {}).get("shared", {})
        want = {"kind": s["kind"], "bucket": s["bucket"], "redirect": bool(s["redirect"])}
        if s["prefix"]:
            want["prefix"] = s["prefix"]
        if s["kind"] == "s3":
            want["path_style"] = bool(s["pathStyle"])
            if s["endpoint"]:
                want["endpoint"] = s["endpoint"]
            if s["region"]:
                want["region"] = s["region"]
        else:
            need("path_style" not in shared and "endpoint" not in shared, "s3-only keys for a non-s3 store")
        if s["kind"] == "gcs" and s["credentials"]["existingSecret"]:
            want["service_account_file"] = "/etc/berth/bucket/service-account.json"
        if s["kind"] == "azure":
            want["account"] = s["account"]
            if s["credentials"]["existingSecret"]:
                want["access_key_file"] = "/etc/berth/bucket/access-key"
        got = {k: shared.get(k) for k in want}
        need(got == want, f"[storage.shared]: {got}, expected {want}")
        need(toml.get("storage", {}).get("root") == v["config"]["storage"]["root"], "storage.root (the local tier)")
        fl = toml.get("fleet", {})
        need(fl.get("peers_dns") == PEERS_DNS and fl.get("secret_file") == "/etc/berth/fleet/secret"
             and fl.get("peer_timeout") == f["peerTimeout"] and "peers" not in fl and "advertise" not in fl,
             f"[fleet]: {fl}")
    return wl, toml_text


# Where the chart mounts the tenancy Secrets, and the berth.toml keys pointing there.
TOKENS_DIR = "/etc/berth/auth/tokens"
HTPASSWD_FILE = "/etc/berth/auth/htpasswd/htpasswd"
CLIENT_CA_FILE = "/etc/berth/auth/client-ca/ca.crt"
CHART_AUTH_KEYS = {"tokens_dir", "htpasswd", "client_ca"}
ROLLING_CHECKSUMS = {"checksum/config", "checksum/secret", "checksum/fleet-secret", "checksum/admin-token"}


def secret_sources(vol):
    """[(Secret name, items or None)] of a secret or projected volume."""
    if "secret" in vol:
        return [(vol["secret"]["secretName"], vol["secret"].get("items"))]
    if "projected" in vol:
        return [(src["secret"]["name"], src["secret"].get("items"))
                for src in vol["projected"].get("sources") or [] if "secret" in src]
    return []


def check_tenancy(v, wl, toml, notes, need):
    """credentials.perRepository, auth.* Secrets, config.auth / config.access pass-through."""
    cred, auth = v["credentials"], v.get("auth") or {}
    per_repo = cred.get("perRepository") or []
    shared = cred["existingSecret"] or (f"{FULLNAME}-credentials" if cred["dockerconfigjson"] else "")
    cfg_auth = dict(v["config"].get("auth") or {})
    if wl:
        spec = wl["spec"]["template"]["spec"]
        c = spec["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {vol["name"]: vol for vol in spec.get("volumes", [])}
        # Upstream credentials: one projected volume at /etc/berth/secrets (no nested mounts).
        want = []
        if shared:
            want.append((shared, [{"key": ".dockerconfigjson", "path": ".dockerconfigjson"}]))
        for e in per_repo:
            want.append((e["existingSecret"], [{"key": ".dockerconfigjson", "path": f"{e['name']}/.dockerconfigjson"}]))
        if want:
            need(mounts.get("/etc/berth/secrets") == "credentials", "upstream credentials not mounted at /etc/berth/secrets")
            got = secret_sources(volumes.get("credentials", {}))
            need(got == want, f"credentials volume sources: {got}, expected {want}")
        else:
            need("credentials" not in volumes and "/etc/berth/secrets" not in mounts, "credentials volume without credentials")
        nested = [m for m in mounts if m.startswith("/etc/berth/secrets/")]
        need(not nested, f"mounts nested in the credentials volume: {nested}")
        # Client authentication Secrets.
        for secret, vname, mount, items in (
            (auth.get("tokensSecret"), "auth-tokens", TOKENS_DIR, None),
            (auth.get("htpasswdSecret"), "auth-htpasswd", os.path.dirname(HTPASSWD_FILE),
             [{"key": auth.get("htpasswdKey"), "path": "htpasswd"}]),
            (auth.get("clientCASecret"), "auth-client-ca", os.path.dirname(CLIENT_CA_FILE),
             [{"key": auth.get("clientCAKey"), "path": "ca.crt"}]),
        ):
            if secret:
                need(mounts.get(mount) == vname, f"{vname} not mounted at {mount}")
                vs = volumes.get(vname, {}).get("secret", {})
                need(vs.get("secretName") == secret and vs.get("items") == items,
                     f"{vname} volume: {vs}, expected the Secret {secret} with items {items}")
                need(secret in notes, f"NOTES.txt does not name the Secret {secret}")
            else:
                need(vname not in volumes and mount not in mounts, f"{vname} volume or mount without its value")
        # The tokens and htpasswd are re-read in place: no checksum (and no rollout) for them.
        ann = wl["spec"]["template"]["metadata"].get("annotations") or {}
        extra = sorted(k for k in ann if k.startswith("checksum/") and k not in ROLLING_CHECKSUMS)
        need(not extra, f"unexpected checksum annotations (token changes must not roll the pods): {extra}")
    if toml is None:
        return
    # [auth]: the chart's keys pointing at the mounts, the rest as written in config.auth.
    want_auth = dict(cfg_auth)
    if auth.get("tokensSecret"):
        want_auth["tokens_dir"] = TOKENS_DIR
    if auth.get("htpasswdSecret"):
        want_auth["htpasswd"] = HTPASSWD_FILE
    if auth.get("clientCASecret"):
        want_auth["client_ca"] = CLIENT_CA_FILE
        srv = toml.get("server", {})
        need(srv.get("tls_cert") and srv.get("tls_key"), "auth.client_ca without server.tls_cert/tls_key")
    if want_auth:
        need(toml.get("auth") == want_auth, f"[auth]: {toml.get('auth')}, expected {want_auth}")
    else:
        need("auth" not in toml, f"[auth] in berth.toml without auth values: {toml.get('auth')}")
    # [[access]]: an array of tables, exactly as written.
    want_access = v["config"].get("access") or []
    need((toml.get("access") or []) == want_access, f"[[access]]: {toml.get('access')}, expected {want_access}")
    # [[upstreams.credentials]]: the ones written in config, then one per perRepository entry.
    hosts = {u["host"]: u for u in toml.get("upstreams", [])}
    for written in v["config"].get("upstreams") or []:
        got = hosts.get(written["host"], {}).get("credentials") or []
        entries = [e for e in per_repo if e["upstream"] == written["host"]]
        want = [dict(c) for c in written.get("credentials") or []]
        for e in entries:
            w = {"name": e["name"], "repositories": e["repositories"],
                 "docker_config": f"/etc/berth/secrets/{e['name']}/.dockerconfigjson"}
            if e.get("quota"):
                w["quota"] = dict(e["quota"])
            want.append(w)
        for w in want:
            if isinstance(w.get("quota"), dict) and "requests" in w["quota"]:
                w["quota"]["requests"] = int(w["quota"]["requests"])
        need(got == want, f"upstreams ({written['host']}).credentials: {got}, expected {want}")
        for g in got:
            q = g.get("quota") or {}
            need(not isinstance(q.get("requests"), float),
                 f"upstreams ({written['host']}).credentials ({g.get('name')}).quota.requests is a float")
        if shared and written["host"] in cred["upstreams"]:
            need(hosts.get(written["host"], {}).get("docker_config") == "/etc/berth/secrets/.dockerconfigjson",
                 f"upstreams ({written['host']}): docker_config is not /etc/berth/secrets/.dockerconfigjson")
    for e in per_repo:
        need(f"{e['upstream']} {e['name']}:" in notes, f"NOTES.txt does not list the account {e['upstream']} {e['name']}")


# Placeholders for files of Secrets that exist before the install (existingSecret values),
# shaped by the berth.toml key naming them. The htpasswd line is `htpasswd -Bbn placeholder
# placeholder`.
PLACEHOLDER_HTPASSWD = b"placeholder:$2y$05$Zg8vvvvNB8XplDxFs8SYXOXvxEDceVoHTu4iPwz7tTNLPX3h6TccW\n"
PLACEHOLDER_TEXT = b"placeholder-for-an-existing-secret"


def placeholder_pems(out):
    """A self-signed certificate and its key (PEM), made with openssl; PEM-shaped text when
    openssl is missing (check-config does not parse it today)."""
    cert, key = os.path.join(out, "placeholder.crt"), os.path.join(out, "placeholder.key")
    if not os.path.exists(cert):
        try:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-days", "2", "-subj", "/CN=berth-check-chart", "-keyout", key, "-out", cert],
                           check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"  note: no openssl ({e}): PEM-shaped placeholders instead of a real certificate")
            with open(cert, "w") as f:
                f.write("-----BEGIN CERTIFICATE-----\nplaceholder\n-----END CERTIFICATE-----\n")
            with open(key, "w") as f:
                f.write("-----BEGIN PRIVATE KEY-----\nplaceholder\n-----END PRIVATE KEY-----\n")
    return open(cert, "rb").read(), open(key, "rb").read()


def write_placeholder(key, local, hosts, out):
    """Writes the placeholder for the berth.toml key `key` (None: unknown) at `local`."""
    if key == "tokens_dir":
        # A Secret volume's layout: ..data -> ..<timestamp>/, one symlink per key; berth
        # skips the hidden entries and follows the links.
        stamp = os.path.join(local, "..2024_01_01_00_00_00.000000000")
        os.makedirs(stamp, exist_ok=True)
        with open(os.path.join(stamp, "team-a"), "w") as f:
            f.write("placeholder-token-0123456789abcdef\n")
        if not os.path.lexists(os.path.join(local, "..data")):
            os.symlink(os.path.basename(stamp), os.path.join(local, "..data"))
        if not os.path.lexists(os.path.join(local, "team-a")):
            os.symlink("..data/team-a", os.path.join(local, "team-a"))
        return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    if key == "docker_config" or local.endswith(".dockerconfigjson"):
        auth = base64.b64encode(b"placeholder:placeholder").decode()
        content = json.dumps({"auths": {h: {"auth": auth} for h in hosts}}).encode()
    elif key == "htpasswd":
        content = PLACEHOLDER_HTPASSWD
    elif key in ("client_ca", "tls_cert", "ca_file"):
        content = placeholder_pems(out)[0]
    elif key == "tls_key":
        content = placeholder_pems(out)[1]
    else:
        content = PLACEHOLDER_TEXT
    with open(local, "wb") as fh:
        fh.write(content)


def write_config_files(docs, wl, toml_text, out, problems):
    """The files berth.toml names under /etc/berth, for `berth check-config`: taken from the
    rendered Secrets the pod mounts there, or placeholders for Secrets that exist before the
    install (existingSecret values, extraVolumes): a tokens directory with one token, a
    bcrypt htpasswd line, PEM certificates and key, a dockerconfigjson with an entry for
    every upstream host."""
    if not wl:
        return
    toml_text = toml_text or ""
    named = re.findall(r'^\s*([A-Za-z_]+) = "(/etc/berth/[^"]*)"', toml_text, re.M)
    key_of = {path: key for key, path in named}
    hosts = re.findall(r'^\s*host = "([^"]+)"', toml_text, re.M)
    local_of = lambda path: os.path.join(out, "etc-berth", path[len("/etc/berth/"):])  # noqa: E731
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs).get("Secret", [])}
    spec = wl["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    for vol in spec.get("volumes", []):
        mount = mounts.get(vol["name"], "")
        if not mount.startswith("/etc/berth/"):
            continue
        for name, items in secret_sources(vol):
            sec = secrets.get(name)
            os.makedirs(local_of(mount), exist_ok=True)
            if sec is not None:
                for it in items or [{"key": k, "path": k} for k in (sec.get("data") or {})]:
                    data = (sec.get("data") or {}).get(it["key"])
                    if data is None:
                        problems.append(f"Secret {name} has no key {it['key']!r} that the pod mounts")
                        continue
                    local = local_of(f"{mount}/{it['path']}")
                    os.makedirs(os.path.dirname(local), exist_ok=True)
                    with open(local, "wb") as fh:
                        fh.write(base64.b64decode(data))
            elif items:
                for it in items:
                    path = f"{mount}/{it['path']}"
                    write_placeholder(key_of.get(path), local_of(path), hosts, out)
            else:
                # The whole Secret: the files berth.toml names in (or as) the mount.
                for key, path in named:
                    if path == mount or path.startswith(mount + "/"):
                        write_placeholder(key, local_of(path), hosts, out)
PY

cat >"$work/chart.py" <<'PY'
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checks
import helm_python as helm

chart_dir, values_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
values = helm.values_from_yaml(open(values_file).read()) if values_file != "-" else None
problems = []
checks.lint(chart_dir, values, problems)
docs, notes = checks.render(chart_dir, values)
checks.write_manifests(docs, os.path.join(out, "manifests"))
wl, toml_text = checks.check(docs, notes, values, chart_dir, problems)
if toml_text is not None:
    with open(os.path.join(out, "berth.toml"), "w") as f:
        f.write(toml_text)
checks.write_config_files(docs, wl, toml_text, out, problems)

kinds = checks.by_kind(docs)
print(f"rendered {len(docs)} manifests: " + ", ".join(f"{k}×{len(v)}" for k, v in sorted(kinds.items())))
if problems:
    for p in problems:
        print("  problem: " + p, file=sys.stderr)
    sys.exit(1)
PY

failures=0
results=()
# pass|FAIL <label> <step>: one line each in the summary at the end.
record() { results+=("$(printf '%-4s  %-40s %s' "$1" "[$2]" "$3")"); }

check_values() {
    local label="$1" values="$2" out="$work/$1"
    mkdir -p "$out/manifests"
    say "[$label] lint (strict) and render"
    if command -v helm >/dev/null 2>&1; then
        local vargs=()
        [ "$values" = "-" ] || vargs=(--values "$values")
        helm lint --strict "${vargs[@]}" "$chart" >"$out/helm-lint.log" 2>&1 ||
            { cat "$out/helm-lint.log" >&2; echo "check-chart: [$label] helm lint --strict failed" >&2; record FAIL "$label" "helm lint --strict"; return 1; }
        record pass "$label" "helm lint --strict"
    else
        say "[$label] no helm binary on PATH: linting with helm-python-sdk only"
    fi
    KUBE_VERSION="$KUBE_VERSION" "$py" "$work/chart.py" "$chart" "$values" "$out" ||
        { echo "check-chart: [$label] lint/render/structure checks failed" >&2; record FAIL "$label" "lint (sdk, strict) + render + structure"; return 1; }
    record pass "$label" "lint (sdk, strict) + render + structure"

    say "[$label] kubernetes-validate --strict -k $KUBE_VERSION (ServiceMonitor skipped: CRD, no bundled schema)"
    local files=()
    for f in "$out"/manifests/*.yaml; do
        case "$(basename "$f")" in skip-*) continue ;; esac
        files+=("$f")
    done
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "${files[@]}" ||
        { echo "check-chart: [$label] kubernetes-validate failed" >&2; record FAIL "$label" "kubernetes-validate --strict"; return 1; }
    record pass "$label" "kubernetes-validate --strict"

    say "[$label] berth check-config on the rendered berth.toml"
    # Point /etc/berth/... at the files taken from the rendered Secrets (placeholders for
    # Secrets that exist before the install).
    sed "s#/etc/berth/#$out/etc-berth/#g" "$out/berth.toml" >"$out/berth-local.toml"
    "$berth" check-config "$out/berth-local.toml" ||
        { sed -n '1,200p' "$out/berth.toml" >&2; echo "check-chart: [$label] berth check-config failed" >&2; record FAIL "$label" "berth check-config"; return 1; }
    record pass "$label" "berth check-config"
}

check_values defaults - || failures=$((failures + 1))
for v in "$chart"/ci/*-values.yaml; do
    [ -e "$v" ] || continue
    check_values "$(basename "$v" .yaml)" "$v" || failures=$((failures + 1))
done

# --- variants of the fleet (and of replicaCount, and tenancy alone) that the CI values files do not cover ---
# Same steps as above; written here rather than as ci/ files so the chart's test values
# stay a few readable examples.
mkdir -p "$work/variants"
cat >"$work/variants/fleet-generated-secret-irsa.yaml" <<'YAML'
# No keys (IRSA), a generated fleet secret, every other fleet value at its default.
replicaCount: 3
serviceAccount:
  annotations:
    eks.amazonaws.com/role-arn: arn:aws:iam::111122223333:role/berth
sharedStorage:
  enabled: true
  bucket: berth-cache
  region: eu-west-1
YAML
cat >"$work/variants/fleet-pvc-hard-inline-secret.yaml" <<'YAML'
# The local tier on a claim per pod (a StatefulSet), one pod per node, the secret inline.
replicaCount: 3
sharedStorage:
  enabled: true
  bucket: berth
  endpoint: https://garage.storage.svc:3900
  region: garage
  pathStyle: true
  localCache:
    type: persistentVolumeClaim
persistence:
  size: 40Gi
fleet:
  secret: an-inline-secret-of-enough-length-for-a-test-0123
  antiAffinity: hard
YAML
cat >"$work/variants/fleet-gcs-ipv6.yaml" <<'YAML'
# GCS with a service-account key; single-stack IPv6 pod addresses; own anti-affinity kept.
replicaCount: 2
sharedStorage:
  enabled: true
  kind: gcs
  bucket: berth-cache
  prefix: prod/
  redirect: true
  credentials:
    existingSecret: berth-gcs
    serviceAccountKey: key.json
fleet:
  ipv6: true
  existingSecret: berth-fleet
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: topology.kubernetes.io/zone
        labelSelector:
          matchLabels:
            app.kubernetes.io/instance: berth
YAML
cat >"$work/variants/fleet-azure-single.yaml" <<'YAML'
# Azure with an access key; one replica (no PodDisruptionBudget by default), no anti-affinity.
replicaCount: 1
sharedStorage:
  enabled: true
  kind: azure
  account: berthstore
  bucket: berth
  credentials:
    existingSecret: berth-azure
fleet:
  antiAffinity: none
YAML
cat >"$work/variants/replicas-without-shared.yaml" <<'YAML'
# Several replicas without shared storage: allowed as before (a StatefulSet, a claim per
# pod), with a warning in NOTES.txt.
replicaCount: 3
YAML
cat >"$work/variants/tenancy-tokens-robot.yaml" <<'YAML'
# Tenancy without the rest: team tokens, rules, and an org robot account for docker.io/myorg
# from an existing Secret (no shared credentials Secret, no TLS).
auth:
  tokensSecret: berth-tokens
credentials:
  perRepository:
    - upstream: docker.io
      name: myorg-robot
      repositories: ["myorg/*"]
      existingSecret: dockerhub-myorg
config:
  auth:
    anonymous: false
  access:
    - principals: ["*"]
      repositories: ["docker.io/library/*"]
    - principals: ["platform", "payments"]
      repositories: ["docker.io/myorg/*"]
# The nodes pull as the principal of a token from an existing Secret.
nodeConfig:
  enabled: true
  endpoint: http://10.96.0.50:5000
  tokenSecret: berth-node-token
  tokenKey: platform
YAML
for v in "$work"/variants/*.yaml; do
    check_values "variant-$(basename "$v" .yaml)" "$v" || failures=$((failures + 1))
done

# --- values mistakes must stop rendering with a message, not render a broken config -------
cat >"$work/render.py" <<'PY'
import sys, helm_python as helm
helm.Chart.load(sys.argv[1]).render(helm.values_from_yaml(open(sys.argv[2]).read()), name="berth", namespace="berth")
PY
# expect_failure <label> <expected text in the error> <values YAML>
expect_failure() {
    local label="$1" expected="$2"
    printf '%s\n' "$3" >"$work/bad-$label.yaml"
    say "[negative-$label] must fail to render, naming: $expected"
    if "$py" "$work/render.py" "$chart" "$work/bad-$label.yaml" 2>"$work/bad-$label.log"; then
        echo "check-chart: [negative-$label] rendered without error" >&2
        record FAIL "negative-$label" "render must fail"
        failures=$((failures + 1))
    elif ! grep -qF -- "$expected" "$work/bad-$label.log"; then
        cat "$work/bad-$label.log" >&2
        echo "check-chart: [negative-$label] failed, but without naming: $expected" >&2
        record FAIL "negative-$label" "render must fail"
        failures=$((failures + 1))
    else
        record pass "negative-$label" "render must fail"
    fi
}
expect_failure unknown-credentials-host 'nope.example' \
    "$(printf 'credentials:\n  existingSecret: hub\n  upstreams: ["nope.example"]')"
expect_failure shared-without-bucket 'sharedStorage.enabled needs sharedStorage.bucket' \
    "$(printf 'sharedStorage:\n  enabled: true')"
expect_failure shared-unknown-kind 'sharedStorage.kind: "minio"' \
    "$(printf 'sharedStorage:\n  enabled: true\n  kind: minio\n  bucket: b')"
expect_failure azure-without-account 'needs sharedStorage.account' \
    "$(printf 'sharedStorage:\n  enabled: true\n  kind: azure\n  bucket: b')"
expect_failure fleet-config-by-hand 'set sharedStorage.enabled=true' \
    "$(printf 'config:\n  fleet:\n    peers_dns: "x:5000"\n    secret_file: /s')"
expect_failure admin-token-twice 'adminToken: set existingSecret or value, not both' \
    "$(printf 'adminToken:\n  existingSecret: berth-admin\n  value: inline')"
expect_failure fleet-static-peers 'leave peers and advertise out' \
    "$(printf 'sharedStorage:\n  enabled: true\n  bucket: b\nconfig:\n  fleet:\n    peers: ["http://10.0.0.7:5000"]')"
expect_failure per-repository-unknown-upstream 'credentials.perRepository[0] (myorg): upstream "nope.example" is not a host in config.upstreams' \
    "$(printf 'credentials:\n  perRepository:\n    - { upstream: nope.example, name: myorg, repositories: ["myorg/*"], existingSecret: s }')"
expect_failure per-repository-duplicate-name 'credentials.perRepository[1] (myorg): the name is also credentials.perRepository[0]' \
    "$(printf 'credentials:\n  perRepository:\n    - { upstream: docker.io, name: myorg, repositories: ["myorg/*"], existingSecret: s }\n    - { upstream: ghcr.io, name: myorg, repositories: ["myorg/*"], existingSecret: t }')"
expect_failure per-repository-bad-name 'credentials.perRepository[0] (My_Org): name must be lowercase letters' \
    "$(printf 'credentials:\n  perRepository:\n    - { upstream: docker.io, name: My_Org, repositories: ["myorg/*"], existingSecret: s }')"
expect_failure per-repository-no-name 'credentials.perRepository[0]: name is required' \
    "$(printf 'credentials:\n  perRepository:\n    - { upstream: docker.io, repositories: ["myorg/*"], existingSecret: s }')"
expect_failure per-repository-no-secret 'credentials.perRepository[0] (myorg): existingSecret is required' \
    "$(printf 'credentials:\n  perRepository:\n    - { upstream: docker.io, name: myorg, repositories: ["myorg/*"] }')"
expect_failure client-ca-without-tls 'auth.clientCASecret: client certificates need TLS on the pull API; set config.server.tls_cert and config.server.tls_key' \
    "$(printf 'auth:\n  clientCASecret: berth-client-ca')"
expect_failure tokens-dir-twice 'config.auth.tokens_dir: leave it out when auth.tokensSecret is set' \
    "$(printf 'auth:\n  tokensSecret: berth-tokens\nconfig:\n  auth:\n    tokens_dir: /elsewhere')"

echo
say "summary:"
for r in "${results[@]}"; do echo "  $r"; done
if [ "$failures" -ne 0 ]; then
    die "$failures check(s) failed (see above)"
fi
say "chart OK"
