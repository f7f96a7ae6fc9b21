# The second domU (a third domain, no xsockd): attacks the link's request nodes when dom0 asks.
python3 /scenario/xsproof.py third
