# skel
