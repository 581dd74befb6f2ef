#!/usr/bin/env bash
# Renders, lints and validates the Helm chart in charts/berth, offline.
#
#   scripts/check-chart.sh            # needs: python3 (with venv), cargo; PyPI on first run
#
# For each values set (the chart's defaults, and charts/berth/ci/*-values.yaml, which
# switch on every optional part):
#   1. lint the chart strictly (`helm lint --strict` when a helm binary is on PATH, and
#      always helm-python-sdk's lint with strict=true: Helm's own Go code, no binary);
#   2. render it (helm-python-sdk, offline) and check what the chart promises: probes,
#      ports, security context, store volume, config checksum;
#   3. validate every rendered manifest with `kubernetes-validate --strict` against the
#      schemas it bundles for Kubernetes $KUBE_VERSION. The ServiceMonitor is skipped: it
#      is a CRD (monitoring.coreos.com/v1) with no bundled schema; its fields are checked
#      in step 2 instead;
#   4. take berth.toml out of the rendered ConfigMap and run `berth check-config` on it,
#      with the files it names (credentials, admin token) taken from the rendered Secrets.
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
cat >"$work/chart.py" <<'PY'
import base64, json, os, sys
import yaml  # PyYAML, a dependency of kubernetes-validate
import helm_python as helm

chart_dir, values_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
values = helm.values_from_yaml(open(values_file).read()) if values_file != "-" else None
problems = []

report = helm.lint(chart_dir, values, strict=True, kube_version="v" + os.environ["KUBE_VERSION"])
for m in report.get("messages") or []:
    if m.get("severity", 0) >= 2:  # 2 warning, 3 error: strict fails on both
        problems.append(f"lint: {m.get('path')}: {m.get('error')}")
for e in report.get("errors") or []:
    problems.append(f"lint: {e}")

rendered = helm.Chart.load(chart_dir).render(values, name="berth", namespace="berth", is_install=True)
docs = []
for path, text in sorted(rendered.items()):
    if not path.endswith((".yaml", ".yml")):
        continue  # NOTES.txt
    for doc in yaml.safe_load_all(text):
        if doc:
            docs.append((path, doc))

kinds = {}
for path, doc in docs:
    kinds.setdefault(doc["kind"], []).append(doc)
    name = f"{doc['kind']}-{doc['metadata']['name']}.yaml"
    if doc["kind"] == "ServiceMonitor":
        name = "skip-" + name  # a CRD: no bundled schema
    with open(os.path.join(out, "manifests", name), "w") as f:
        yaml.safe_dump(doc, f)

def need(cond, what):
    if not cond:
        problems.append(what)

(sts,) = kinds.get("StatefulSet", [None]) or [None]
need(sts is not None, "no StatefulSet rendered")
if sts:
    pod = sts["spec"]["template"]
    c = pod["spec"]["containers"][0]
    need(c["args"][-3:] == ["serve", "--config", "/etc/berth/berth.toml"], f"berth args: {c['args']}")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    need(ports == {"registry": 5000, "admin": 5001}, f"container ports: {ports}")
    need(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, "liveness probe")
    need(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, "readiness probe")
    sc, psc = c["securityContext"], pod["spec"]["securityContext"]
    need(sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 65532 and sc.get("runAsGroup") == 65532, "runAsNonRoot/65532")
    need(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    need(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL")
    need(psc.get("fsGroup") == 65532 and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "fsGroup/seccomp")
    need("checksum/config" in pod["metadata"].get("annotations", {}), "checksum/config annotation")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    need("/var/lib/berth" in mounts, "store not mounted at /var/lib/berth")
    vct = sts["spec"]["volumeClaimTemplates"][0]
    need(vct["metadata"]["name"] == "store" and vct["spec"]["resources"]["requests"]["storage"] == (values or {}).get("persistence", {}).get("size", "25Gi"), "volumeClaimTemplate size")

services = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
need({"berth", "berth-admin"} <= set(services), f"services: {sorted(services)}")

for sm in kinds.get("ServiceMonitor", []):
    ep = sm["spec"]["endpoints"][0]
    need(ep.get("port") == "admin" and ep.get("path") == "/metrics", "ServiceMonitor endpoint")
    sel = sm["spec"]["selector"]["matchLabels"]
    admin = services.get("berth-admin", {}).get("metadata", {}).get("labels", {})
    need(all(admin.get(k) == v for k, v in sel.items()), "ServiceMonitor selects the admin Service")
    need(all(services["berth"]["metadata"]["labels"].get(k) == v for k, v in sel.items()) is False,
         "ServiceMonitor must not select the pull Service")

for cm in kinds.get("ConfigMap", []):
    if "berth.json" in cm.get("data", {}):
        json.loads(cm["data"]["berth.json"])  # the dashboard survives templating
        need(cm["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard label")

cms = [cm for cm in kinds.get("ConfigMap", []) if "berth.toml" in cm.get("data", {})]
need(len(cms) == 1, "exactly one ConfigMap with berth.toml")
if cms:
    with open(os.path.join(out, "berth.toml"), "w") as f:
        f.write(cms[0]["data"]["berth.toml"])

# Files the config names under /etc/berth, from the rendered Secrets, for check-config.
for s in kinds.get("Secret", []):
    for key, b64 in (s.get("data") or {}).items():
        sub = "secrets" if s["type"] == "kubernetes.io/dockerconfigjson" else "admin-token"
        os.makedirs(os.path.join(out, "etc-berth", sub), exist_ok=True)
        with open(os.path.join(out, "etc-berth", sub, key), "wb") as f:
            f.write(base64.b64decode(b64))

print(f"rendered {len(docs)} manifests: " + ", ".join(f"{k}×{len(v)}" for k, v in sorted(kinds.items())))
if problems:
    for p in problems:
        print("  problem: " + p, file=sys.stderr)
    sys.exit(1)
PY

failures=0
check_values() {
    local label="$1" values="$2" out="$work/$1"
    mkdir -p "$out/manifests"
    say "[$label] lint (strict) and render"
    if command -v helm >/dev/null 2>&1; then
        local vargs=()
        [ "$values" = "-" ] || vargs=(--values "$values")
        helm lint --strict "${vargs[@]}" "$chart" >"$out/helm-lint.log" 2>&1 ||
            { cat "$out/helm-lint.log" >&2; echo "check-chart: [$label] helm lint --strict failed" >&2; return 1; }
    else
        say "[$label] no helm binary on PATH: linting with helm-python-sdk only"
    fi
    KUBE_VERSION="$KUBE_VERSION" "$py" "$work/chart.py" "$chart" "$values" "$out" ||
        { echo "check-chart: [$label] lint/render/structure checks failed" >&2; return 1; }

    say "[$label] kubernetes-validate --strict -k $KUBE_VERSION (ServiceMonitor skipped: CRD, no bundled schema)"
    local files=()
    for f in "$out"/manifests/*.yaml; do
        case "$(basename "$f")" in skip-*) continue ;; esac
        files+=("$f")
    done
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "${files[@]}" ||
        { echo "check-chart: [$label] kubernetes-validate failed" >&2; return 1; }

    say "[$label] berth check-config on the rendered berth.toml"
    # Point /etc/berth/... at the files taken from the rendered Secrets.
    sed "s#/etc/berth/#$out/etc-berth/#g" "$out/berth.toml" >"$out/berth-local.toml"
    "$berth" check-config "$out/berth-local.toml" ||
        { sed -n '1,200p' "$out/berth.toml" >&2; echo "check-chart: [$label] berth check-config failed" >&2; return 1; }
}

check_values defaults - || failures=$((failures + 1))
for v in "$chart"/ci/*-values.yaml; do
    [ -e "$v" ] || continue
    check_values "$(basename "$v" .yaml)" "$v" || failures=$((failures + 1))
done

# A values mistake must stop rendering with a message, not render a broken config.
say "[negative] credentials.upstreams naming an unknown host must fail to render"
printf 'credentials:\n  existingSecret: hub\n  upstreams: ["nope.example"]\n' >"$work/bad-values.yaml"
if "$py" - "$chart" "$work/bad-values.yaml" <<'PY' 2>"$work/bad.log"; then
import sys, helm_python as helm
helm.Chart.load(sys.argv[1]).render(helm.values_from_yaml(open(sys.argv[2]).read()), name="berth", namespace="berth")
PY
    echo "check-chart: [negative] rendered without error" >&2
    failures=$((failures + 1))
elif ! grep -q 'nope.example' "$work/bad.log"; then
    cat "$work/bad.log" >&2
    echo "check-chart: [negative] failed, but without naming the host" >&2
    failures=$((failures + 1))
fi

if [ "$failures" -ne 0 ]; then
    die "$failures check(s) failed (see above)"
fi
say "chart OK"
