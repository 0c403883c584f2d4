output "bucket_name" {
  value = aws_s3_bucket.data.id
}

output "bucket_arn" {
  value = aws_s3_bucket.data.arn
}

output "input_uri" {
  description = "INPUT_URI for params.env (or a folder below it)."
  value       = "s3://${aws_s3_bucket.data.id}/${var.input_prefix}"
}

output "output_uri" {
  description = "Put DATA_URI in params.env below this (e.g. <output_uri>v1)."
  value       = "s3://${aws_s3_bucket.data.id}/${var.output_prefix}"
}

output "preprocess_policy_arn" {
  value = aws_iam_policy.preprocess.arn
}

output "train_policy_arn" {
  value = aws_iam_policy.train.arn
}
