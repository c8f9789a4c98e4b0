"""Monitoring pieces shared by the monitor stage: drift statistics and alert sinks."""
