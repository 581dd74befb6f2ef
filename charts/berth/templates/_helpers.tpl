{{/* The chart name, truncated to Kubernetes' 63-character limit. */}}
{{- define "berth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "berth.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "berth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "berth.labels" -}}
helm.sh/chart: {{ include "berth.chart" . }}
{{ include "berth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of berth's pods (the StatefulSet or, for a fleet, the Deployment). */}}
{{- define "berth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end }}

{{/* Selector labels of the node-configuration DaemonSet's pods. */}}
{{- define "berth.nodeConfigSelectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-config
{{- end }}

{{- define "berth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "berth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "berth.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the Secret holding upstream credentials, or "" when there is none. */}}
{{- define "berth.credentialsSecret" -}}
{{- if and .Values.credentials.existingSecret .Values.credentials.dockerconfigjson }}
{{- fail "credentials: set existingSecret or dockerconfigjson, not both" }}
{{- end }}
{{- if .Values.credentials.existingSecret }}
{{- .Values.credentials.existingSecret }}
{{- else if .Values.credentials.dockerconfigjson }}
{{- printf "%s-credentials" (include "berth.fullname" .) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the admin token: adminToken.existingSecret, or the one the
chart makes (templates/admin-token-secret.yaml). There is always one: berth refuses admin
mutations without a token. */}}
{{- define "berth.adminTokenSecret" -}}
{{- if and .Values.adminToken.existingSecret .Values.adminToken.value }}
{{- fail "adminToken: set existingSecret or value, not both" }}
{{- end }}
{{- if not .Values.adminToken.key }}
{{- fail "adminToken.key must name the Secret's key that holds the token" }}
{{- end }}
{{- default (printf "%s-admin-token" (include "berth.fullname" .)) .Values.adminToken.existingSecret }}
{{- end }}

{{/*
berth.toml: .Values.config with what the chart adds (docker_config on the upstreams in
credentials.upstreams, [[upstreams.credentials]] for credentials.perRepository, the
config.auth keys of the auth.* Secrets, server.admin_token_file always), as TOML.
*/}}
{{- define "berth.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- if not (kindIs "map" $cfg) }}
{{- fail "config must be a map (the content of berth.toml)" }}
{{- end }}
{{- $upstreams := $cfg.upstreams | default list }}
{{- /* Helm reads every YAML number as a float, and toToml would write 10000 as 10000.0,
       which berth's integer keys refuse: make the integer keys integers again. */}}
{{- with $cfg.server }}{{ if hasKey . "max_connections" }}{{ $_ := set . "max_connections" (int64 .max_connections) }}{{ end }}{{ end }}
{{- with $cfg.client_budgets }}{{ if hasKey . "requests" }}{{ $_ := set . "requests" (int64 .requests) }}{{ end }}{{ end }}
{{- range $u := $upstreams }}
{{- if kindIs "map" $u.quota }}{{ if hasKey $u.quota "requests" }}{{ $_ := set $u.quota "requests" (int64 $u.quota.requests) }}{{ end }}{{ end }}
{{- if kindIs "slice" $u.credentials }}{{ range $c := $u.credentials }}{{ if and (kindIs "map" $c) (kindIs "map" $c.quota) }}{{ if hasKey $c.quota "requests" }}{{ $_ := set $c.quota "requests" (int64 $c.quota.requests) }}{{ end }}{{ end }}{{ end }}{{ end }}
{{- end }}
{{- include "berth.perRepositoryConfig" (dict "upstreams" $upstreams "values" .Values) }}
{{- include "berth.authConfig" (dict "cfg" $cfg "values" .Values) }}
{{- if include "berth.credentialsSecret" . }}
{{- range $host := .Values.credentials.upstreams }}
{{- $found := false }}
{{- range $u := $upstreams }}
{{- if eq $u.host $host }}
{{- $_ := set $u "docker_config" "/etc/berth/secrets/.dockerconfigjson" }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "credentials.upstreams: %q is not a host in config.upstreams" $host) }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := include "berth.adminTokenSecret" . }}
{{- $server := $cfg.server | default dict }}
{{- $_ := set $server "admin_token_file" (printf "/etc/berth/admin-token/%s" .Values.adminToken.key) }}
{{- $_ := set $cfg "server" $server }}
{{- if include "berth.fleet" . }}
{{- $storage := $cfg.storage | default dict }}
{{- $_ := set $storage "shared" (merge (include "berth.sharedStorageConfig" . | fromYaml) ($storage.shared | default dict)) }}
{{- $_ := set $cfg "storage" $storage }}
{{- $fleet := $cfg.fleet | default dict }}
{{- if or $fleet.peers $fleet.advertise }}
{{- fail "config.fleet: leave peers and advertise out; the chart finds peers through the headless Service (peers_dns) and sets BERTH_FLEET_ADVERTISE per pod" }}
{{- end }}
{{- $_ := set $fleet "peers_dns" (include "berth.peersDNS" .) }}
{{- $_ := set $fleet "secret_file" "/etc/berth/fleet/secret" }}
{{- $_ := set $fleet "peer_timeout" .Values.fleet.peerTimeout }}
{{- $_ := set $cfg "fleet" $fleet }}
{{- else if or (and (kindIs "map" $cfg.storage) (hasKey $cfg.storage "shared")) (hasKey $cfg "fleet") }}
{{- fail "config.storage.shared / config.fleet: set sharedStorage.enabled=true (and sharedStorage.*) instead; the chart then adds the peers Service, the fleet secret and the pod settings a fleet needs" }}
{{- end }}
{{- toToml $cfg }}
{{- end }}

{{/* "true" when sharedStorage is on (a fleet), else "". Validates the sharedStorage values. */}}
{{- define "berth.fleet" -}}
{{- if .Values.sharedStorage.enabled }}
{{- $s := .Values.sharedStorage }}
{{- if not (has $s.kind (list "s3" "gcs" "azure")) }}
{{- fail (printf "sharedStorage.kind: %q is not one of s3, gcs, azure" $s.kind) }}
{{- end }}
{{- if not $s.bucket }}
{{- fail "sharedStorage.enabled needs sharedStorage.bucket" }}
{{- end }}
{{- if and (eq $s.kind "azure") (not $s.account) }}
{{- fail "sharedStorage.kind azure needs sharedStorage.account" }}
{{- end }}
{{- if not (has $s.localCache.type (list "emptyDir" "persistentVolumeClaim")) }}
{{- fail (printf "sharedStorage.localCache.type: %q is not emptyDir or persistentVolumeClaim" $s.localCache.type) }}
{{- end }}
{{- if not (has (toString .Values.fleet.antiAffinity) (list "soft" "hard" "none" "")) }}
{{- fail (printf "fleet.antiAffinity: %q is not soft, hard or none" .Values.fleet.antiAffinity) }}
{{- end }}
{{- if and .Values.fleet.existingSecret .Values.fleet.secret }}
{{- fail "fleet: set existingSecret or secret, not both" }}
{{- end }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/* The workload kind: Deployment for a fleet with an emptyDir local tier, else StatefulSet. */}}
{{- define "berth.workloadKind" -}}
{{- if and (include "berth.fleet" .) (eq .Values.sharedStorage.localCache.type "emptyDir") }}
{{- print "Deployment" }}
{{- else }}
{{- print "StatefulSet" }}
{{- end }}
{{- end }}

{{/* config.storage.shared from the sharedStorage values, as YAML (keys as in berth.toml). */}}
{{- define "berth.sharedStorageConfig" -}}
{{- $s := .Values.sharedStorage }}
kind: {{ $s.kind | quote }}
bucket: {{ $s.bucket | quote }}
{{- with $s.prefix }}
prefix: {{ . | quote }}
{{- end }}
redirect: {{ $s.redirect }}
{{- if eq $s.kind "s3" }}
{{- with $s.endpoint }}
endpoint: {{ . | quote }}
{{- end }}
{{- with $s.region }}
region: {{ . | quote }}
{{- end }}
path_style: {{ $s.pathStyle }}
{{- else if eq $s.kind "gcs" }}
{{- if $s.credentials.existingSecret }}
service_account_file: "/etc/berth/bucket/service-account.json"
{{- end }}
{{- else if eq $s.kind "azure" }}
account: {{ $s.account | quote }}
{{- if $s.credentials.existingSecret }}
access_key_file: "/etc/berth/bucket/access-key"
{{- end }}
{{- end }}
{{- end }}

{{/* The headless Service through which the replicas find each other. */}}
{{- define "berth.peersService" -}}
{{- printf "%s-peers" (include "berth.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* config.fleet.peers_dns: <headless>.<namespace>.svc.<domain>:<pull port>. */}}
{{- define "berth.peersDNS" -}}
{{- printf "%s.%s.svc.%s:%s" (include "berth.peersService" .) .Release.Namespace .Values.fleet.clusterDomain (include "berth.port" .Values.config.server.listen) }}
{{- end }}

{{/* Name of the Secret holding the fleet's shared secret. */}}
{{- define "berth.fleetSecret" -}}
{{- default (printf "%s-fleet" (include "berth.fullname" .)) .Values.fleet.existingSecret }}
{{- end }}

{{/* "true" when the PodDisruptionBudget is rendered: enabled true, or auto with a fleet of more than one. */}}
{{- define "berth.pdbEnabled" -}}
{{- $e := toString .Values.podDisruptionBudget.enabled }}
{{- if eq $e "true" }}
{{- print "true" }}
{{- else if and (eq $e "auto") (include "berth.fleet" .) (gt (int .Values.replicaCount) 1) }}
{{- print "true" }}
{{- else if not (has $e (list "false" "auto" "true")) }}
{{- fail (printf "podDisruptionBudget.enabled: %q is not true, false or auto" $e) }}
{{- end }}
{{- end }}

{{/* The port of a "host:port" listen address. */}}
{{- define "berth.port" -}}
{{- splitList ":" . | last }}
{{- end }}

{{/* berth's pull address as nodes reach it, for containerd's hosts.toml. */}}
{{- define "berth.nodeEndpoint" -}}
{{- if .Values.nodeConfig.endpoint }}
{{- .Values.nodeConfig.endpoint }}
{{- else if and .Values.service.clusterIP (ne .Values.service.clusterIP "None") }}
{{- printf "http://%s:%v" .Values.service.clusterIP .Values.service.port }}
{{- else }}
{{- fail "nodeConfig.enabled needs nodeConfig.endpoint or a fixed service.clusterIP: nodes cannot resolve cluster DNS names" }}
{{- end }}
{{- end }}

{{/* "true" when the pod mounts upstream credentials at /etc/berth/secrets (the shared
credentials Secret, per-repository Secrets, or both, in one projected volume). */}}
{{- define "berth.upstreamCredentialsVolume" -}}
{{- if or (include "berth.credentialsSecret" .) .Values.credentials.perRepository }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/* Validates credentials.perRepository and appends an [[upstreams.credentials]] block per
entry to its upstream. Called by berth.config with (dict "upstreams" <the copied
config.upstreams> "values" .Values); renders nothing. */}}
{{- define "berth.perRepositoryConfig" -}}
{{- $upstreams := .upstreams }}
{{- $list := .values.credentials.perRepository | default list }}
{{- if not (kindIs "slice" $list) }}
{{- fail "credentials.perRepository must be a list of {upstream, name, repositories, existingSecret, quota}" }}
{{- end }}
{{- $seen := dict }}
{{- range $i, $p := $list }}
{{- $at := printf "credentials.perRepository[%d]" $i }}
{{- if not (kindIs "map" $p) }}
{{- fail (printf "%s must be a map {upstream, name, repositories, existingSecret, quota}" $at) }}
{{- end }}
{{- range $k, $_ := $p }}
{{- if not (has $k (list "upstream" "name" "repositories" "existingSecret" "quota")) }}
{{- fail (printf "%s: unknown key %q (keys: upstream, name, repositories, existingSecret, quota)" $at $k) }}
{{- end }}
{{- end }}
{{- if not $p.name }}
{{- fail (printf "%s: name is required (lowercase letters, digits and '-'; it names the account and its directory /etc/berth/secrets/<name>)" $at) }}
{{- end }}
{{- $name := toString $p.name }}
{{- $at = printf "%s (%s)" $at $name }}
{{- if or (gt (len $name) 63) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name)) }}
{{- fail (printf "%s: name must be lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters (it becomes the directory /etc/berth/secrets/<name>)" $at) }}
{{- end }}
{{- if eq $name "default" }}
{{- fail (printf "%s: the name \"default\" is taken (it names an upstream's own credentials)" $at) }}
{{- end }}
{{- if hasKey $seen $name }}
{{- fail (printf "%s: the name is also credentials.perRepository[%v]'s; names must be unique" $at (get $seen $name)) }}
{{- end }}
{{- $_ := set $seen $name $i }}
{{- if not $p.existingSecret }}
{{- fail (printf "%s: existingSecret is required (a Secret of type kubernetes.io/dockerconfigjson)" $at) }}
{{- end }}
{{- if or (not (kindIs "slice" $p.repositories)) (not $p.repositories) }}
{{- fail (printf "%s: repositories must list at least one pattern below the upstream, e.g. [\"myorg/*\"]" $at) }}
{{- end }}
{{- $entry := dict "name" $name "repositories" $p.repositories "docker_config" (printf "/etc/berth/secrets/%s/.dockerconfigjson" $name) }}
{{- if $p.quota }}
{{- if not (kindIs "map" $p.quota) }}
{{- fail (printf "%s: quota must be a map, e.g. { requests: 5000, per: 1d }" $at) }}
{{- end }}
{{- $quota := deepCopy $p.quota }}
{{- if hasKey $quota "requests" }}{{ $_ := set $quota "requests" (int64 $quota.requests) }}{{ end }}
{{- $_ := set $entry "quota" $quota }}
{{- end }}
{{- $found := false }}
{{- range $u := $upstreams }}
{{- if and (kindIs "map" $u) (eq (toString $u.host) (toString $p.upstream)) }}
{{- $creds := $u.credentials | default list }}
{{- if not (kindIs "slice" $creds) }}
{{- fail (printf "config.upstreams (%s).credentials must be a list" $u.host) }}
{{- end }}
{{- $_ := set $u "credentials" (append $creds $entry) }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "%s: upstream %q is not a host in config.upstreams" $at (toString $p.upstream)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Sets config.auth's tokens_dir, htpasswd and client_ca from the auth.* Secrets, after
checking them. Called by berth.config with (dict "cfg" <the copied config> "values"
.Values); renders nothing. */}}
{{- define "berth.authConfig" -}}
{{- $cfg := .cfg }}
{{- $v := .values.auth | default dict }}
{{- if or $v.tokensSecret $v.htpasswdSecret $v.clientCASecret }}
{{- $auth := $cfg.auth | default dict }}
{{- if not (kindIs "map" $auth) }}
{{- fail "config.auth must be a map (berth.toml's [auth])" }}
{{- end }}
{{- if $v.tokensSecret }}
{{- if hasKey $auth "tokens_dir" }}
{{- fail "config.auth.tokens_dir: leave it out when auth.tokensSecret is set; the chart mounts the Secret at /etc/berth/auth/tokens and sets it" }}
{{- end }}
{{- $_ := set $auth "tokens_dir" "/etc/berth/auth/tokens" }}
{{- end }}
{{- if $v.htpasswdSecret }}
{{- if hasKey $auth "htpasswd" }}
{{- fail "config.auth.htpasswd: leave it out when auth.htpasswdSecret is set; the chart mounts the Secret at /etc/berth/auth/htpasswd/ and sets it" }}
{{- end }}
{{- if not $v.htpasswdKey }}
{{- fail "auth.htpasswdKey must name the key of auth.htpasswdSecret that holds the htpasswd file" }}
{{- end }}
{{- $_ := set $auth "htpasswd" "/etc/berth/auth/htpasswd/htpasswd" }}
{{- end }}
{{- if $v.clientCASecret }}
{{- if hasKey $auth "client_ca" }}
{{- fail "config.auth.client_ca: leave it out when auth.clientCASecret is set; the chart mounts the Secret at /etc/berth/auth/client-ca/ and sets it" }}
{{- end }}
{{- if not $v.clientCAKey }}
{{- fail "auth.clientCAKey must name the key of auth.clientCASecret that holds the CA certificates" }}
{{- end }}
{{- $server := $cfg.server | default dict }}
{{- if not (and $server.tls_cert $server.tls_key) }}
{{- fail "auth.clientCASecret: client certificates need TLS on the pull API; set config.server.tls_cert and config.server.tls_key (PEM files you mount with extraVolumes/extraVolumeMounts, e.g. a kubernetes.io/tls Secret at /etc/berth/tls)" }}
{{- end }}
{{- $_ := set $auth "client_ca" "/etc/berth/auth/client-ca/ca.crt" }}
{{- end }}
{{- $_ := set $cfg "auth" $auth }}
{{- end }}
{{- end }}
