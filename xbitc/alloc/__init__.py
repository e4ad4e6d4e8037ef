"""Learned bit allocation: task-loss sensitivities of every weight, and the budgeted choice of per-column depths."""
