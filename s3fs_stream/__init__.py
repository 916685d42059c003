"""s3stream: stream writes into S3 multipart uploads through a FUSE mount."""

__version__ = "0.1.0"
