"""A throwaway S3-compatible server for tests: now :class:`irg.store.SeaweedS3` (re-exported here)."""

from irg.store import GRPC_OFFSET, SeaweedS3, find_weed, free_port_pairs, port_is_free

__all__ = ["GRPC_OFFSET", "SeaweedS3", "find_weed", "free_port_pairs", "port_is_free"]
