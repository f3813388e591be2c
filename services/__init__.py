"""Services around facecore: storage, job running and the HTTP API.

facecore stays free of I/O policy; everything that decides where data lives and who may see
it belongs here.
"""
