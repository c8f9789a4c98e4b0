"""Plots, the HTML run report and the monitor's report."""
