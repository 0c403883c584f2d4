# Least privilege for the two jobs: preprocess reads the input prefix and writes the output prefix; training only
# reads the output prefix (its checkpoints go to a shared volume, not to this bucket).

data "aws_partition" "current" {}

locals {
  # Built from the name (not aws_s3_bucket.data.arn) so that `terraform plan` shows the complete policies.
  bucket_arn = "arn:${data.aws_partition.current.partition}:s3:::${var.bucket_name}"
  # s3fs lists "prefix/" for directories and "prefix" (no slash) when probing whether a path exists.
  input_list_prefixes  = [trimsuffix(var.input_prefix, "/"), "${var.input_prefix}*"]
  output_list_prefixes = [trimsuffix(var.output_prefix, "/"), "${var.output_prefix}*"]
  # Roles are attached by name; a role ARN is arn:aws:iam::ACCOUNT:role[/path]/NAME.
  preprocess_roles = { for arn in var.preprocess_role_arns : arn => element(split("/", arn), length(split("/", arn)) - 1) }
  train_roles      = { for arn in var.train_role_arns : arn => element(split("/", arn), length(split("/", arn)) - 1) }
}

data "aws_iam_policy_document" "preprocess" {
  statement {
    sid       = "ListInputAndOutput"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = concat(local.input_list_prefixes, local.output_list_prefixes)
    }
  }
  statement {
    sid       = "ReadInput"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${var.input_prefix}*"]
  }
  # Read back: resuming from OUTPUT/_work; delete: --overwrite and the cleanup of _work once manifest.json exists;
  # multipart: shards are uploaded in parts, and a failed upload is aborted.
  statement {
    sid = "WriteOutput"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.bucket_arn}/${var.output_prefix}*"]
  }
  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "UseBucketKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

data "aws_iam_policy_document" "train" {
  statement {
    sid       = "ListShards"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = local.output_list_prefixes
    }
  }
  statement {
    sid       = "ReadShards"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${var.output_prefix}*"]
  }
  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "UseBucketKey"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_policy" "preprocess" {
  name        = "${var.bucket_name}-preprocess"
  description = "jpeglm preprocess: read s3://${var.bucket_name}/${var.input_prefix}, write s3://${var.bucket_name}/${var.output_prefix}"
  policy      = data.aws_iam_policy_document.preprocess.json
}

resource "aws_iam_policy" "train" {
  name        = "${var.bucket_name}-train"
  description = "jpeglm train: read s3://${var.bucket_name}/${var.output_prefix}"
  policy      = data.aws_iam_policy_document.train.json
}

resource "aws_iam_role_policy_attachment" "preprocess" {
  for_each   = local.preprocess_roles
  role       = each.value
  policy_arn = aws_iam_policy.preprocess.arn
}

resource "aws_iam_role_policy_attachment" "train" {
  for_each   = local.train_roles
  role       = each.value
  policy_arn = aws_iam_policy.train.arn
}
