"""news"""
