{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "detstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, with the chart name unless it is already in it. */}}
{{- define "detstream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "detstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of the operator's pods and their selector. */}}
{{- define "detstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "detstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "detstream.labels" -}}
helm.sh/chart: {{ include "detstream.chart" . }}
app.kubernetes.io/name: {{ include "detstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "detstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "detstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Name of a cluster-scoped object: releases of the same name in two namespaces must not clash. */}}
{{- define "detstream.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "detstream.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "detstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Namespaces the operator watches (namespaced mode): watchNamespaces, or the release's. */}}
{{- define "detstream.watchNamespaces" -}}
{{- $namespaces := .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- toJson $namespaces -}}
{{- end -}}

{{/*
The operator's permissions: the one list used by both the namespaced Role and the ClusterRole.
Argument: a dict with "clusterWide" (bool).
*/}}
{{- define "detstream.operatorRules" -}}
- apiGroups: ["detstream.io"]
  resources: ["streamingsessions"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["detstream.io"]
  resources: ["streamingsessions/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["kopf.dev"]
  resources: [{{ if .clusterWide }}"clusterkopfpeerings"{{ else }}"kopfpeerings"{{ end }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end -}}

{{/* kopf discovers the resources it serves through the CRDs: cluster-scoped, read only. */}}
{{- define "detstream.crdDiscoveryRule" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}
