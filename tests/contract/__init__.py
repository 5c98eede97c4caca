"""Behaviour suites written once and run against every backend (Django SessionTestsMixin style)."""
