# The proof's vchan part alone, in a short boot: python tests/xen/harness.py vchan.
python3 /scenario/xsproof.py vchan
sed 's/^/DOM0-XSOCKD: /' /tmp/xsockd.log | tail -30
