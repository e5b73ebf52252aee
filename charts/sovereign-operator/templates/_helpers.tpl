{{- define "sovereign-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sovereign-operator.fullname" -}}
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

{{- define "sovereign-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sovereign-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sovereign-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sovereign-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sovereign-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "sovereign-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sovereign-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The requests the workload policies look at: creating a top-level batch Job, JobSet or
TrainJob labelled with the allocation label (the argument), or changing its label or suspend.
Other updates (status, finalizers, the garbage collector's) pass untouched. */}}
{{- define "sovereign-operator.workloadMatch" -}}
matchConstraints:
  resourceRules:
    - apiGroups: ["batch"]
      apiVersions: ["v1"]
      operations: ["CREATE", "UPDATE"]
      resources: ["jobs"]
    - apiGroups: ["jobset.x-k8s.io"]
      apiVersions: ["*"]
      operations: ["CREATE", "UPDATE"]
      resources: ["jobsets"]
    - apiGroups: ["trainer.kubeflow.org"]
      apiVersions: ["*"]
      operations: ["CREATE", "UPDATE"]
      resources: ["trainjobs"]
matchConditions:
  - name: labelled-now-or-before
    expression: >-
      (has(object.metadata.labels) && '{{ . }}' in object.metadata.labels) ||
      (oldObject != null && has(oldObject.metadata.labels) && '{{ . }}' in oldObject.metadata.labels)
  - name: top-level
    expression: "!has(object.metadata.ownerReferences) || !object.metadata.ownerReferences.exists(r, has(r.controller) && r.controller)"
  - name: creates-or-changes-allocation-or-suspend
    expression: >-
      request.operation == 'CREATE' ||
      (has(object.metadata.labels) && '{{ . }}' in object.metadata.labels ? object.metadata.labels['{{ . }}'] : '') !=
      (has(oldObject.metadata.labels) && '{{ . }}' in oldObject.metadata.labels ? oldObject.metadata.labels['{{ . }}'] : '') ||
      (has(object.spec.suspend) && object.spec.suspend) != (has(oldObject.spec.suspend) && oldObject.spec.suspend)
{{- end }}
