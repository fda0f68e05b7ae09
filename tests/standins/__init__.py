"""Local stand-ins for the cloud, started and stopped by the tests on 127.0.0.1 (test harness only)."""
