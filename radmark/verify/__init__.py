"""Verification: key-independent evidence about a suspect, the registered exact tests scored
against it, their statistics, and the verdict with its multiple-testing correction."""
