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
The operator's permissions: the one list used by both the namespaced Role and the ClusterRole, and
no more than it uses (tests/test_helm_install.py runs the operator with only this ServiceAccount's
token and checks that its log has no RBAC denial):
- StreamingSessions: kopf lists, watches and patches them (finalizer, progress annotations) and
  patches their status subresource; it never gets, updates (PUT) or creates them.
- The children (ConfigMap, Services, StatefulSets, Deployment, NetworkPolicy): server-side apply is a
  PATCH, and an apply that creates the object is also authorized as "create"; the prune lists them
  by label and deletes the strays.
- Pods: listed for the status. Events: kopf creates them.
- kopf peering (only with peering.enabled): list, watch and patch of the peering object.
Argument: a dict with "clusterWide" and "peering" (bools).
*/}}
{{- define "detstream.operatorRules" -}}
- apiGroups: ["detstream.io"]
  resources: ["streamingsessions"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["detstream.io"]
  resources: ["streamingsessions/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies", "ingresses"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .sessionKeys }}
# Sessions with spec.security (CURVE, mutual TLS): the operator keeps each session's keys in a
# Secret it creates (server-side apply: create, patch) and reads back its own client certificate.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
{{- end }}
{{- if .peering }}
- apiGroups: ["kopf.dev"]
  resources: [{{ if .clusterWide }}"clusterkopfpeerings"{{ else }}"kopfpeerings"{{ end }}]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/*
What kopf observes cluster-wide, read only: the CRDs (to notice its resource appear or change) and,
when it watches given namespaces, the namespaces: without "list namespaces" kopf retries for about a
minute before it serves any session, then falls back to assuming the namespaces exist.
Argument: a dict with "clusterWide" (bool).
*/}}
{{- define "detstream.observationRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not .clusterWide }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end -}}
