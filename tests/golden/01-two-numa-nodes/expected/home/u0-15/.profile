# skel profile
