"""mapdet.evaluation"""
