# The domU's side of the proof: an agent that does what dom0's driver asks.
python3 /scenario/xsproof.py domu
