{{/*
Names are cut at 63 characters because Kubernetes labels and DNS-1035 Service names allow no more.
*/}}
{{- define "dlmoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dlmoe.fullname" -}}
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

{{/* A component's object name: the release's full name and the component, within 63 characters. */}}
{{- define "dlmoe.componentName" -}}
{{- printf "%s-%s" (include "dlmoe.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "dlmoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Called with dict "root" $ "component" NAME. */}}
{{- define "dlmoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dlmoe.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dlmoe.labels" -}}
helm.sh/chart: {{ include "dlmoe.chart" .root }}
{{ include "dlmoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dlmoe
{{- end -}}

{{/* An image reference; the tag defaults to the chart's appVersion so one chart release pins its images. */}}
{{- define "dlmoe.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "dlmoe.mlflow.external" -}}
{{- if .Values.mlflow.externalTrackingUri -}}true{{- end -}}
{{- end -}}

{{- define "dlmoe.mlflow.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "dlmoe.componentName" (dict "root" . "component" "mlflow")) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/*
The tracking URI every component uses. The in-chart Service is named by its fully qualified domain because the
training pods that log to it may run in other namespaces than the release's.
*/}}
{{- define "dlmoe.mlflow.trackingUri" -}}
{{- if include "dlmoe.mlflow.external" . -}}
{{- .Values.mlflow.externalTrackingUri -}}
{{- else -}}
{{- printf "http://%s:%d" (include "dlmoe.mlflow.serviceHost" .) (int .Values.mlflow.service.port) -}}
{{- end -}}
{{- end -}}

{{- define "dlmoe.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "dlmoe.componentName" (dict "root" . "component" "operator")) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator watches in namespaced mode; the release's own when none are listed. */}}
{{- define "dlmoe.operator.watchedNamespaces" -}}
{{- if eq .Values.operator.watch.mode "cluster" -}}
{{- if .Values.operator.watch.namespaces -}}
{{- fail "operator.watch.namespaces must be empty when operator.watch.mode is cluster (the operator then watches every namespace)" -}}
{{- end -}}
{{- else -}}
{{- $namespaces := .Values.operator.watch.namespaces | default (list .Release.Namespace) | uniq -}}
{{- toJson $namespaces -}}
{{- end -}}
{{- end -}}

{{/*
Exactly what the operator calls: it patches DiffusionTrainingJobs and their status, owns a ConfigMap and a RayJob
per attempt, reads the S3 credential Secrets a job names, and records Events (kopf posts core v1 Events; the
events.k8s.io group is the same objects through the newer API).
*/}}
{{- define "dlmoe.operator.rules" -}}
- apiGroups: ["dlmoe.io"]
  resources: ["diffusiontrainingjobs"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["dlmoe.io"]
  resources: ["diffusiontrainingjobs/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/*
Python writes caches under $HOME; with a read-only root filesystem HOME points at the /tmp emptyDir instead.
*/}}
{{- define "dlmoe.tmpEnv" -}}
- name: HOME
  value: /tmp
{{- end -}}

{{- define "dlmoe.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "dlmoe.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}
