{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "loraops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraops.fullname" -}}
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

{{- define "loraops.registry.fullname" -}}
{{- printf "%s-registry" (include "loraops.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraops.gateway.fullname" -}}
{{- printf "%s-gateway" (include "loraops.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: include "loraops.labels" (dict "ctx" $ "component" "registry") */}}
{{- define "loraops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraops.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loraops.labels" -}}
helm.sh/chart: {{ include "loraops.chart" .ctx }}
{{ include "loraops.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: loraops
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Images: include "loraops.image" (dict "ctx" $ "override" .Values.gateway.image) */}}
{{- define "loraops.image" -}}
{{- $repo := .ctx.Values.image.repository -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag -}}
{{- with .override -}}
{{- if .repository }}{{ $repo = .repository }}{{ end -}}
{{- if .tag }}{{ $tag = .tag }}{{ end -}}
{{- end -}}
{{- printf "%s:%s" $repo (toString $tag) -}}
{{- end -}}

{{/* Mode and derived settings ------------------------------------------------------------ */}}

{{- define "loraops.production" -}}
{{- if eq .Values.mode "production" }}true{{ end -}}
{{- end -}}

{{- define "loraops.registry.replicas" -}}
{{- if kindIs "invalid" .Values.registry.replicas -}}
{{- if include "loraops.production" . }}2{{ else }}1{{ end -}}
{{- else -}}
{{- int64 .Values.registry.replicas -}}
{{- end -}}
{{- end -}}

{{- define "loraops.registry.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "loraops.registry.fullname" .) .Release.Namespace (int64 .Values.registry.service.port) -}}
{{- end -}}

{{/* The Secret that holds the JWT key material, or "" when none is mounted. */}}
{{- define "loraops.auth.secretName" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if eq .Values.auth.mode "hs256" -}}
{{- printf "%s-auth" (include "loraops.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Cross-field checks, with messages that say what to set. Included by every workload. */}}
{{- define "loraops.validate" -}}
{{- $prod := include "loraops.production" . -}}
{{- if $prod -}}
{{- if not .Values.database.existingSecret -}}
{{- fail "mode=production needs a PostgreSQL URL: set database.existingSecret to a Secret whose key database.urlKey (default \"database-url\") holds postgres://USER:PASSWORD@HOST:5432/DB" -}}
{{- end -}}
{{- if not .Values.objectStore.url -}}
{{- fail "mode=production needs shared object storage: set objectStore.url (e.g. s3://bucket/prefix)" -}}
{{- end -}}
{{- if hasPrefix "/" .Values.objectStore.url -}}
{{- fail "mode=production: objectStore.url must be object storage (s3://…), not a local directory, so that every registry replica sees the same blobs" -}}
{{- end -}}
{{- else -}}
{{- if gt (int64 (include "loraops.registry.replicas" .)) 1 -}}
{{- fail "mode=embedded runs SQLite on one volume: registry.replicas must be 1 (use mode=production with PostgreSQL and S3 for more)" -}}
{{- end -}}
{{- end -}}
{{- if and (ne .Values.auth.mode "hs256") (ne .Values.auth.mode "jwks-url") (not .Values.auth.existingSecret) -}}
{{- fail (printf "auth.mode=%s needs auth.existingSecret: a Secret holding the %s" .Values.auth.mode (ternary "JWKS file (key auth.jwksKey)" "PEM public key (key auth.publicKeyKey)" (eq .Values.auth.mode "jwks"))) -}}
{{- end -}}
{{- if and .Values.gateway.enabled (ne .Values.auth.mode "hs256") (not .Values.gateway.registryToken.existingSecret) -}}
{{- fail "the gateway needs a registry token: set gateway.registryToken.existingSecret (a JWT with the gateway role: it reads routing and adapters and reports per-arm observations); the chart can only mint one itself with auth.mode=hs256" -}}
{{- end -}}
{{- if and .Values.training.enabled (ne .Values.auth.mode "hs256") (not .Values.training.publisherToken.existingSecret) -}}
{{- fail "training needs a publisher token (it reports the run to the registry, pulls training.initAdapter and pushes the adapter): set training.publisherToken.existingSecret; the chart can only mint one itself with auth.mode=hs256" -}}
{{- end -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.existingClaim) (or .Values.gateway.enabled .Values.training.enabled) -}}
{{- fail "model.source=pvc needs model.existingClaim: a PersistentVolumeClaim holding the base model directory" -}}
{{- end -}}
{{- if and (eq .Values.model.source "download") (not .Values.model.url) (or .Values.gateway.enabled .Values.training.enabled) -}}
{{- fail "model.source=download needs model.url (e.g. s3://bucket/models/NAME)" -}}
{{- end -}}
{{- if .Values.training.enabled -}}
{{- if and .Values.training.push .Values.training.registerBase .Values.training.publisherToken.existingSecret (not .Values.training.adminToken.existingSecret) -}}
{{- fail "training.registerBase registers the base model before the push, which takes the admin role: set training.adminToken.existingSecret (a JWT with the admin role), or training.registerBase=false when the base model is registered already" -}}
{{- end -}}
{{- if and (eq .Values.training.data.source "pvc") (not .Values.training.data.existingClaim) -}}
{{- fail "training.data.source=pvc needs training.data.existingClaim: a PersistentVolumeClaim holding training.data.file" -}}
{{- end -}}
{{- if and (eq .Values.training.data.source "download") (not .Values.training.data.url) -}}
{{- fail "training.data.source=download needs training.data.url (e.g. s3://bucket/data/train.jsonl)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.gateway.autoscaling.enabled (not .Values.gateway.autoscaling.customMetric.enabled) (kindIs "invalid" .Values.gateway.autoscaling.targetCPUUtilizationPercentage) -}}
{{- fail "gateway.autoscaling needs a metric: set targetCPUUtilizationPercentage or enable customMetric" -}}
{{- end -}}
{{- end -}}

{{/* Environment ------------------------------------------------------------------------- */}}

{{/* Auth key material as configuration: LORAOPS_AUTH__HS256_SECRET from the Secret (hs256). */}}
{{- define "loraops.env.auth" -}}
{{- if eq .Values.auth.mode "hs256" }}
- name: LORAOPS_AUTH__HS256_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "loraops.auth.secretName" . }}
      key: {{ .Values.auth.hs256SecretKey }}
{{- end }}
{{- end -}}

{{- define "loraops.env.s3" -}}
{{- if .Values.s3.existingSecret }}
- name: LORAOPS_S3__ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: LORAOPS_S3__SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- end -}}

{{- define "loraops.env.database" -}}
{{- if include "loraops.production" . }}
- name: LORAOPS_REGISTRY__DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- end }}
{{- end -}}

{{/* Volumes for the auth key files (rs256/es256/jwks) and the revoked-token list. */}}
{{- define "loraops.volumes.auth" -}}
{{- if has .Values.auth.mode (list "rs256" "es256" "jwks") }}
- name: auth-keys
  secret:
    secretName: {{ .Values.auth.existingSecret }}
    defaultMode: 0440
{{- end }}
- name: revoked-tokens
  configMap:
    name: {{ include "loraops.fullname" . }}-revoked-tokens
{{- end -}}

{{- define "loraops.mounts.auth" -}}
{{- if has .Values.auth.mode (list "rs256" "es256" "jwks") }}
- name: auth-keys
  mountPath: /etc/loraops/auth
  readOnly: true
{{- end }}
{{- /* A directory mount, not subPath: only those see the ConfigMap's updates. */}}
- name: revoked-tokens
  mountPath: /etc/loraops/revoked
  readOnly: true
{{- end -}}

{{/* Config sections --------------------------------------------------------------------- */}}

{{- define "loraops.config.auth" -}}

[auth]
audience = {{ .Values.auth.audience | toJson }}
{{- with .Values.auth.issuer }}
issuer = {{ . | toJson }}
{{- end }}
leeway_secs = {{ int64 .Values.auth.leewaySecs }}
roles_claim = {{ .Values.auth.rolesClaim | toJson }}
max_token_lifetime_secs = {{ int64 .Values.auth.maxTokenLifetimeSecs }}
revoked_tokens_file = "/etc/loraops/revoked/revoked-tokens"
{{- if eq .Values.auth.mode "jwks-url" }}
jwks_url = {{ required "auth.jwksUrl is required with auth.mode=jwks-url" .Values.auth.jwksUrl | toJson }}
{{- end }}
{{- with .Values.auth.roleMapping }}

[auth.role_mapping]
{{- range $k, $v := . }}
{{ $k | toJson }} = {{ toJson $v }}
{{- end }}
{{- end }}
{{- if or (eq .Values.auth.mode "rs256") (eq .Values.auth.mode "es256") }}
public_key_file = {{ printf "/etc/loraops/auth/%s" .Values.auth.publicKeyKey | toJson }}
public_key_alg = {{ upper .Values.auth.mode | toJson }}
{{- else if eq .Values.auth.mode "jwks" }}
jwks_file = {{ printf "/etc/loraops/auth/%s" .Values.auth.jwksKey | toJson }}
{{- end }}
{{- end -}}

{{- define "loraops.config.log" -}}

[log]
json = {{ .Values.log.json }}
{{- with .Values.log.level }}
level = {{ . | toJson }}
{{- end }}
{{- end -}}

{{/* The model volume and the init containers that fill it ------------------------------- */}}

{{- define "loraops.volumes.model" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- else }}
- name: model
  emptyDir:
    sizeLimit: {{ .Values.model.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "loraops.mounts.model" -}}
- name: model
  mountPath: /models/base
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.subPath }}
  subPath: {{ .Values.model.subPath }}
  {{- end }}
{{- end -}}

{{/* The downloader's S3 environment (AWS CLI conventions). */}}
{{- define "loraops.env.downloader" -}}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
- name: HOME
  value: /tmp
{{- end -}}

{{/* include "loraops.initContainers.model" (dict "ctx" $ "image" IMAGE) */}}
{{- define "loraops.initContainers.model" -}}
{{- $ := .ctx -}}
{{- if eq $.Values.model.source "tiny" }}
- name: model-init-tiny
  image: {{ .image }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  args: ["model", "init-tiny", "/models/base"]
  securityContext: {{- toYaml $.Values.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 128Mi
    limits:
      memory: 512Mi
  volumeMounts:
    - name: model
      mountPath: /models/base
    - name: tmp
      mountPath: /tmp
{{- else if eq $.Values.model.source "download" }}
- name: model-download
  image: {{ printf "%s:%s" $.Values.model.downloader.image.repository (toString $.Values.model.downloader.image.tag) }}
  imagePullPolicy: {{ $.Values.model.downloader.image.pullPolicy }}
  command: ["aws", "s3", "sync", "--only-show-errors", {{ $.Values.model.url | quote }}, "/models/base"]
  env: {{- include "loraops.env.downloader" $ | nindent 4 }}
  securityContext: {{- toYaml $.Values.securityContext | nindent 4 }}
  resources: {{- toYaml $.Values.model.downloader.resources | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: /models/base
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Resources with the GPU added to limits: include "loraops.resources" (dict "resources" R "gpu" G) */}}
{{- define "loraops.resources" -}}
{{- $r := deepCopy (.resources | default dict) -}}
{{- if .gpu.enabled -}}
{{- $limits := deepCopy (get $r "limits" | default dict) -}}
{{- $_ := set $limits .gpu.resourceName (int64 .gpu.count) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* A shell line that mints a token from the HS256 secret into LORAOPS_TOKEN (used when no
     token Secret is given): include "loraops.mintToken" (dict "config" PATH "sub" SUB "role" ROLE) */}}
{{- define "loraops.mintToken" -}}
LORAOPS_TOKEN="$(loraops --config {{ .config }} --data-dir /tmp/loraops token issue --sub {{ .sub }} --role {{ .role }} --ttl 365d)" && export LORAOPS_TOKEN
{{- end -}}
