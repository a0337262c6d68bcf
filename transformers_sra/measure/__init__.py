"""Layer 4"""
