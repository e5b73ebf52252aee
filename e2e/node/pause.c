/* The pod sandbox ("pause") image of the test cluster's real node: holds the pod's namespaces,
 * reaps orphans, exits on TERM/INT. Built statically by e2e/lib/node.sh (no registry here). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, 0, WNOHANG) > 0) {}
}

int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
