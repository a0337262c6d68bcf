"""Layer 5"""
