"""Checkpoint I/O: a validating safetensors reader and streaming writers, and the checkpoint
schema (a folder of shards whose headers say how to read every quantized tensor)."""
from .checkpoint import Checkpoint, CheckpointEntry, CheckpointWriter, shard_name
from .safetensors_io import SafetensorsFile, ShardWriter, TensorEntry, write_safetensors

__all__ = [
    "Checkpoint",
    "CheckpointEntry",
    "CheckpointWriter",
    "SafetensorsFile",
    "ShardWriter",
    "TensorEntry",
    "shard_name",
    "write_safetensors",
]
