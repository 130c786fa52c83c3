{{- define "pgale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgale.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "pgale.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pgale.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pgale.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pgale.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pgale.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The environment variable holding a target's dsn: PG_ADVISORY_LOCK_DSN_ORDERS_DB for orders-db. */}}
{{- define "pgale.dsnEnv" -}}
PG_ADVISORY_LOCK_DSN_{{ regexReplaceAll "[^A-Z0-9]" (upper .) "_" }}
{{- end -}}

{{/* The config file the ConfigMap carries: the values' config, with the dsn (or each target's)
     from the Secret, through the environment. */}}
{{- define "pgale.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- if .Values.targets -}}
{{- $targets := default dict (get $config "targets") -}}
{{- range $name, $_ := $targets -}}
{{- if not (hasKey $.Values.targets $name) -}}
{{- fail (printf "config.targets.%s: no Secret for its dsn: add targets.%s.existingSecret" $name $name) -}}
{{- end -}}
{{- end -}}
{{- range $name, $secret := .Values.targets -}}
{{- $target := default dict (get $targets $name) -}}
{{- $_ := set $target "dsn" (printf "${%s}" (include "pgale.dsnEnv" $name)) -}}
{{- $_ := set $targets $name $target -}}
{{- end -}}
{{- $_ := set $config "targets" $targets -}}
{{- else -}}
{{- $_ := set $config "dsn" "${PG_ADVISORY_LOCK_DSN}" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
