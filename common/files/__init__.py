"""Files both sides write and trust: crash-safe writes (`atomic`), the cross-process lock
(`locking`), the named-arrays format (`arrays_file`), output paths checked before a command writes
(`output_paths`), the hash-chained audit log (`audit_log`) and content hashes (`digest`)."""
