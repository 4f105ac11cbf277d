{{/* The release's resource name. */}}
{{- define "llm.name" -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "llm.labels" -}}
app.kubernetes.io/name: llm-inference
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The labels that select the inference pods (the Rollouts controller adds the pod-template hash). */}}
{{- define "llm.selector" -}}
app.kubernetes.io/name: llm-inference
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The startup window in seconds: how long weight loading may take before the pod is restarted. */}}
{{- define "llm.startupWindow" -}}
{{- mul .Values.probes.startup.periodSeconds .Values.probes.startup.failureThreshold -}}
{{- end -}}
