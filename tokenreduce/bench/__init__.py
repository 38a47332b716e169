"""The benchmark harness behind `make bench`: reduced models timed side by side with the baseline."""
