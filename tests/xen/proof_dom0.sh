# The proof (tests/xen/guest/xsproof.py drives it from dom0; the domU runs its agent).
python3 /scenario/xsproof.py dom0
sed 's/^/DOM0-XSOCKD: /' /tmp/xsockd.log | tail -30
