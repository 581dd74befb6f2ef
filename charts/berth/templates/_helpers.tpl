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
credentials.upstreams, server.admin_token_file always), as TOML.
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
{{- end }}
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
