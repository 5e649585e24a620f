"""Private messages: /msg NAME TEXT and /reply TEXT."""
