"""The jobs the command lines run (score, distill, self-distill): resolve, record, resume, write."""
