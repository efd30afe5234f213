"""mapdet.engine"""
