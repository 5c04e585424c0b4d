"""Package ``data_pipeline``: storage URIs, tokenizers, the shard format, the tokenize job and the training stream.

May import: pyarrow, ray.data, boto3, tokenizers, numpy and ``dlmoe.errors`` — never the model or torch training
code. Today: ``tokenizers`` (the byte-level vocabulary and Hugging Face ``tokenizer.json``). The rest arrives with
the "Data pipeline" issue; the single-process trainer in ``dlmoe.train.local`` reads the embedded default corpus
on its own until then.
"""
