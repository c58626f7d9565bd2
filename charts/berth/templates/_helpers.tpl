{{- define "berth.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "berth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: berth
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "berth.selector" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "berth.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{- define "berth.clusterName" -}}
{{- default .Release.Name .Values.clusterName -}}
{{- end -}}

{{/* Restricted container security context shared by both components. */}}
{{- define "berth.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Namespace of the node agents' Leases. */}}
{{- define "berth.l2Namespace" -}}
{{- default (printf "%s-l2" (include "berth.fullname" .)) .Values.nodeproxy.l2.leaseNamespace -}}
{{- end -}}

{{/* The default class among the chart's classes (first by name, as the controller picks),
or nothing. */}}
{{- define "berth.defaultClass" -}}
{{- $names := list -}}
{{- range .Values.loadBalancerClasses -}}
{{- if .default -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- end -}}
{{- if $names -}}
{{- first (sortAlpha $names) -}}
{{- end -}}
{{- end -}}

{{/* The controller's leader Lease in the release namespace (its RBAC names it). Kept at
the controller's default so replicas of a chart before and after an upgrade elect on one
Lease. */}}
{{- define "berth.leaderLease" -}}
berth-controller
{{- end -}}
