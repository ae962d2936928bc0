//! The integration-test binary: property tests of the failover core on the
//! simulator, and scenarios with real `hasync` processes on loopback.

mod suite;
