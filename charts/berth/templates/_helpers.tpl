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

{{/* Selector labels of berth's pods (the StatefulSet). */}}
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

{{/* Name of the Secret holding the admin token, or "" when there is none. */}}
{{- define "berth.adminTokenSecret" -}}
{{- if and .Values.adminToken.existingSecret .Values.adminToken.value }}
{{- fail "adminToken: set existingSecret or value, not both" }}
{{- end }}
{{- if .Values.adminToken.existingSecret }}
{{- .Values.adminToken.existingSecret }}
{{- else if .Values.adminToken.value }}
{{- printf "%s-admin-token" (include "berth.fullname" .) }}
{{- end }}
{{- end }}

{{/*
berth.toml: .Values.config with what the chart adds (docker_config on the upstreams in
credentials.upstreams, server.admin_token_file), as TOML.
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
{{- if include "berth.adminTokenSecret" . }}
{{- $server := $cfg.server | default dict }}
{{- $_ := set $server "admin_token_file" (printf "/etc/berth/admin-token/%s" .Values.adminToken.key) }}
{{- $_ := set $cfg "server" $server }}
{{- end }}
{{- toToml $cfg }}
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
