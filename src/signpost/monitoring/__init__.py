"""Monitoring pieces shared by the monitor stage: drift statistics, the verdict and its typed result, alert sinks,
feedback batches."""
