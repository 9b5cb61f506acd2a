//! Integration test support: see tests/tests/.
