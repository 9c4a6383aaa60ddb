"""Target device profiles (memory, bandwidth, peak throughput per unit and dtype, preferred
backends), the roofline lower bound, and host calibration. See docs/devices.md."""
from edgeseq.devices.calibrate import cache_path, cached_host, calibrate_host
from edgeseq.devices.catalog import builtin_files, get_profile, load_profiles
from edgeseq.devices.profile import (DATA_DIR, DTYPES, ENV_VAR, KINDS, UNITS, Cluster,
                                     ComputeUnit, DeviceError, DeviceProfile, Memory, Roofline,
                                     canonical_dtype, roofline, roofline_seconds)

__all__ = ["DATA_DIR", "DTYPES", "ENV_VAR", "KINDS", "UNITS", "Cluster", "ComputeUnit",
           "DeviceError", "DeviceProfile", "Memory", "Roofline", "builtin_files", "cache_path",
           "cached_host", "calibrate_host", "canonical_dtype", "get_profile", "load_profiles",
           "roofline", "roofline_seconds"]
