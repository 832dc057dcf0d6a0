"""`launcher`: one torchrun per host from hosts.yaml (plan / run / doctor); no training logic here.

hosts.py validates the file, plan.py turns it into each host's exact command, run.py starts and
supervises them, doctor.py checks the hosts. docs/launcher.md describes the mechanism.
"""
