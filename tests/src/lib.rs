//! skiff-tests: end-to-end tests that use Skiff's public APIs the way a user
//! would — real files, real fsync, real processes. Shared helpers live here;
//! the tests are in `tests/`.
