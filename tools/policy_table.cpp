// Prints the autocast op-eligibility table as Markdown, straight from the code
// (scripts/update_readme.sh pastes it into the README; a test checks they agree).
#include <mixprec/mixprec.hpp>

int main() { mixprec::amp::print_policy_table(std::cout, /*markdown=*/true); }
