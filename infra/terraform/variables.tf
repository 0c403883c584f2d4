variable "region" {
  description = "AWS region of the bucket (put it where the clusters run: cross-region reads cost egress)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Name of the bucket holding the input images and the preprocessed shards."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 characters: lowercase letters, digits, dots and hyphens."
  }
}

variable "input_prefix" {
  description = "Key prefix of the input images (read by preprocess), e.g. \"raw/\" for s3://BUCKET/raw/."
  type        = string
  default     = "raw/"
  validation {
    condition     = can(regex("^[^/].*/$", var.input_prefix))
    error_message = "input_prefix must not start with \"/\" and must end with \"/\"."
  }
}

variable "output_prefix" {
  description = "Key prefix preprocess writes shards under (its --output values live below it) and training reads."
  type        = string
  default     = "shards/"
  validation {
    condition     = can(regex("^[^/].*/$", var.output_prefix))
    error_message = "output_prefix must not start with \"/\" and must end with \"/\"."
  }
}

variable "preprocess_role_arns" {
  description = "IAM roles the preprocess job runs as (e.g. the IRSA role of the jpeglm-preprocess service account); the preprocess policy is attached to each."
  type        = list(string)
  default     = []
}

variable "train_role_arns" {
  description = "IAM roles the training job runs as (e.g. the IRSA role of the jpeglm-train service account); the read-only train policy is attached to each."
  type        = list(string)
  default     = []
}

variable "versioning_enabled" {
  description = "Keep overwritten and deleted objects as noncurrent versions for noncurrent_version_days (see README: on by default)."
  type        = bool
  default     = true
}

variable "noncurrent_version_days" {
  description = "Days a noncurrent (overwritten or deleted) object version is kept before it expires."
  type        = number
  default     = 7
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which unfinished multipart uploads (left by killed writers; invisible but billed) are aborted."
  type        = number
  default     = 1
}

variable "kms_key_arn" {
  description = "KMS key for SSE-KMS; null uses SSE-S3 (AES-256, no key policy to manage)."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete a non-empty bucket. Leave false outside throwaway environments."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
