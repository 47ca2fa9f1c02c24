"""Harnesses that run real peers for integration tests: Orthanc and the OHIF viewer."""
