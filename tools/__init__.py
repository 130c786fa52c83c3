"""Set-up scripts run by the Makefile (tools/fetch.py: `make tools`); the tests read its paths."""
