"""Layer 2"""
