"""Keys: the owner's secret and everything derived from it (carriers, signatures), the
content-addressed keystore and the signed records it holds."""
