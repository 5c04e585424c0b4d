"""Package ``data_pipeline``: storage URIs, tokenizers, the shard format, the tokenize job and the training stream.

May import: pyarrow, ray.data, boto3, tokenizers, numpy and ``dlmoe.errors`` — never the model or torch training
code. Lives here: ``storage`` (URIs → pyarrow filesystems, bounded retries), ``tokenizers`` (byte-level and
``tokenizer.json``), ``shards`` (parquet shard format, manifest, verify), ``tokenize`` (the Ray Data tokenize
job), ``stream`` (``TokenStream``, the deterministic resumable training reader), ``ray_jobs`` (Ray set-up) and
``local_s3`` (a moto S3 server for tests, benchmarks and trying the S3 path).
"""
