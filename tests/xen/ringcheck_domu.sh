step domu-idle PASS
